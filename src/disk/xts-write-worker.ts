import { writeSync } from 'node:fs';
import { parentPort, workerData } from 'node:worker_threads';
import { XTS_SECTOR, XtsSectors } from './xts.js';

/** Worker: encrypts a cluster (AES-256-XTS, sectors numbered by host offset) and writes it to the image. */
export interface XtsWriteRequest {
  seq: number;
  /** The plaintext, a whole cluster (ownership moves here). */
  data: ArrayBuffer;
  /** Byte offset in the image file, which also numbers the sectors (QEMU's LUKS in qcow2 uses host offsets). */
  host: number;
}

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
  clusterSize: number;
}

const init = workerData as XtsWriterInit;
const xts = new XtsSectors(Buffer.from(init.key));
const WASM_PAGE = 65536;
/** Direct I/O needs a page-aligned buffer; a WebAssembly memory is one (a mapping of its own). */
const aligned = init.directFd === null ? null : Buffer.from(new WebAssembly.Memory({ initial: Math.ceil(init.clusterSize / WASM_PAGE) }).buffer, 0, init.clusterSize);

parentPort!.on('message', (req: XtsWriteRequest) => {
  let error: XtsWriteResult['error'] = null;
  try {
    const plain = Buffer.from(req.data);
    const direct = aligned !== null && plain.length === init.clusterSize && req.host % init.clusterSize === 0;
    const sealed = xts.encrypt(plain, req.host / XTS_SECTOR, direct ? aligned : undefined);
    // A short write (a disk filling up) is continued, through the page cache (direct I/O needs
    // aligned offsets): the next write fails with the OS's own error.
    for (let done = 0; done < sealed.length;) {
      const n = writeSync(direct && done === 0 ? init.directFd! : init.fd, sealed, done, sealed.length - done, req.host + done);
      if (n === 0) throw new Error(`nothing written at ${req.host + done}`);
      done += n;
    }
  } catch (err) {
    error = { message: (err as Error).message, code: (err as NodeJS.ErrnoException).code };
  }
  parentPort!.postMessage({ seq: req.seq, error } satisfies XtsWriteResult);
});
