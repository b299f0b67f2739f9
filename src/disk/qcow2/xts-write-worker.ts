import { writeSync } from 'node:fs';
import { parentPort, workerData } from 'node:worker_threads';
import { XTS_SECTOR, XtsSectors } from './xts.js';

/** Worker: encrypts a cluster (AES-256-XTS, sectors numbered by host offset) and writes it to the image. */
export type XtsWriteRequest = XtsWriteBody & { seq: number };

export type XtsWriteBody = {
  /** Byte offset in the image file, which also numbers the sectors (QEMU's LUKS in qcow2 uses host offsets). */
  host: number;
} & (
  /** The plaintext in slot `slot` of the shared slots, its first `length` bytes (the main thread keeps the slot until the answer). */
  | { slot: number; length: number }
  /** Pieces of one cluster, each at its own offset in slot `slot` and written at `host` + that offset (a delta's pages). */
  | { slot: number; pieces: { offset: number; length: number }[] }
  /** The plaintext, a whole cluster (ownership moves here): when every slot was busy. */
  | { data: ArrayBuffer }
);

export interface XtsWriteResult {
  seq: number;
  error: { message: string; code?: string } | null;
}

export interface XtsWriterInit {
  key: Uint8Array;
  /** The image, open for writing by the process. */
  fd: number;
  /** The same image opened with O_DIRECT, or null where the file system refuses it. */
  directFd: number | null;
  /** Plaintext slots shared with the main thread, each `slotSize` bytes. */
  slots: SharedArrayBuffer;
  slotSize: number;
}

const init = workerData as XtsWriterInit;
const xts = new XtsSectors(Buffer.from(init.key));

parentPort!.on('message', (req: XtsWriteRequest) => {
  let error: XtsWriteResult['error'] = null;
  try {
    if ('pieces' in req) {
      // Through the page cache: a few pages written with O_DIRECT wait for the device (64 KiB: 0.09 ms here, against
      // 0.02 ms cached) on this one thread; the base writer's fdatasync makes them durable all the same.
      for (const p of req.pieces) write(Buffer.from(init.slots, req.slot * init.slotSize + p.offset, p.length), req.host + p.offset, false);
    } else {
      write('data' in req ? Buffer.from(req.data) : Buffer.from(init.slots, req.slot * init.slotSize, req.length), req.host);
    }
  } catch (err) {
    error = { message: (err as Error).message, code: (err as NodeJS.ErrnoException).code };
  }
  parentPort!.postMessage({ seq: req.seq, error } satisfies XtsWriteResult);
});

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
