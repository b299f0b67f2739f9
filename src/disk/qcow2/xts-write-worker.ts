import { writeSync } from 'node:fs';
import { parentPort, workerData } from 'node:worker_threads';
import { SUBCLUSTERS } from './subclusters.js';
import { XTS_SECTOR, XtsSectors } from './xts.js';

/** Worker: encrypts a cluster (AES-256-XTS, sectors numbered by host offset) and writes it to the image. */
export type XtsWriteRequest = XtsWriteBody & { seq: number };

export type XtsWriteBody = {
  /** Byte offset in the image file, which also numbers the sectors (QEMU's LUKS in qcow2 uses host offsets). */
  host: number;
} & (
  /**
   * The plaintext in the shared slot `slot`, its first `length` bytes (the main thread keeps the slot until the answer).
   * `subcluster`: subclusters of that many bytes that hold only zeros are not written (the answer's `written` names the others).
   */
  | { slot: SharedArrayBuffer; length: number; subcluster?: number }
  /** Pieces of one cluster, each at its own offset in slot `slot` and written at `host` + that offset (a delta's pages). */
  | { slot: SharedArrayBuffer; pieces: { offset: number; length: number }[] }
  /** The plaintext, a whole cluster (ownership moves here): when every slot was busy. */
  | { data: ArrayBuffer; subcluster?: number }
);

export interface XtsWriteResult {
  seq: number;
  error: { message: string; code?: string } | null;
  /** With `subcluster`: the subclusters written (bit k: subcluster k), the others hold zeros. */
  written?: number;
}

export interface XtsWriterInit {
  key: Uint8Array;
  /** The image, open for writing by the process. */
  fd: number;
  /** The same image opened with O_DIRECT, or null where the file system refuses it. */
  directFd: number | null;
}

const init = workerData as XtsWriterInit;
const xts = new XtsSectors(Buffer.from(init.key));

parentPort!.on('message', (req: XtsWriteRequest) => {
  let error: XtsWriteResult['error'] = null;
  let written: number | undefined;
  try {
    if ('pieces' in req) {
      // Through the page cache: a few pages written with O_DIRECT wait for the device (64 KiB: 0.09 ms here, against
      // 0.02 ms cached) on this one thread; the base writer's fdatasync makes them durable all the same.
      for (const p of req.pieces) write(Buffer.from(req.slot, p.offset, p.length), req.host + p.offset, false);
    } else {
      const plain = 'data' in req ? Buffer.from(req.data) : Buffer.from(req.slot, 0, req.length);
      if (req.subcluster && plain.length === SUBCLUSTERS * req.subcluster) written = writeNonZero(plain, req.host, req.subcluster);
      else write(plain, req.host);
    }
  } catch (err) {
    error = { message: (err as Error).message, code: (err as NodeJS.ErrnoException).code };
  }
  parentPort!.postMessage({ seq: req.seq, error, written } satisfies XtsWriteResult);
});

let zeros = Buffer.alloc(0);

/**
 * Writes the subclusters of `plain` (a cluster) that hold anything but zeros, runs of them at a
 * time, and answers which: a chunk that is partly zeros (free space inside a file system) costs
 * its data, not its cluster. The check is a memcmp that stops at the first non-zero byte.
 */
function writeNonZero(plain: Buffer, host: number, subcluster: number): number {
  if (zeros.length !== subcluster) zeros = Buffer.alloc(subcluster);
  const count = plain.length / subcluster;
  let mask = 0;
  let run = -1;
  for (let k = 0; k <= count; k++) {
    if (k < count && !zeros.equals(plain.subarray(k * subcluster, (k + 1) * subcluster))) {
      mask |= 1 << k;
      if (run < 0) run = k;
    } else if (run >= 0) {
      write(plain.subarray(run * subcluster, k * subcluster), host + run * subcluster);
      run = -1;
    }
  }
  return mask >>> 0;
}

/** Encrypts `plain` (whole sectors) as the sectors at byte `host` of the image and writes it there. */
function write(plain: Buffer, host: number, direct = true): void {
  const sealed = xts.encryptView(plain, host / XTS_SECTOR);
  // Direct I/O needs the buffer (slots are page aligned), the offset and the length in whole pages.
  const aligned = direct && plain.length % 4096 === 0 && host % 4096 === 0;
  // A short write (a disk filling up) is continued, through the page cache (direct I/O needs
  // aligned offsets): the next write fails with the OS's own error.
  for (let done = 0; done < sealed.length;) {
    const fd = aligned && done === 0 ? (init.directFd ?? init.fd) : init.fd;
    const n = writeSync(fd, sealed, done, sealed.length - done, host + done);
    if (n === 0) throw new Error(`nothing written at ${host + done}`);
    done += n;
  }
}
