import { writeSync } from 'node:fs';
import { parentPort, workerData } from 'node:worker_threads';
import { XTS_SECTOR, XtsSectors } from './xts.js';

/** Worker: encrypts a cluster (AES-256-XTS, sectors numbered by host offset) and writes it to the image's descriptor. */
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

const init = workerData as { key: Uint8Array; fd: number };
const xts = new XtsSectors(Buffer.from(init.key));

parentPort!.on('message', (req: XtsWriteRequest) => {
  let error: XtsWriteResult['error'] = null;
  try {
    const sealed = xts.encrypt(Buffer.from(req.data), req.host / XTS_SECTOR);
    // A short write (a disk filling up) is continued: the next write fails with the OS's own error.
    for (let done = 0; done < sealed.length;) {
      const n = writeSync(init.fd, sealed, done, sealed.length - done, req.host + done);
      if (n === 0) throw new Error(`nothing written at ${req.host + done}`);
      done += n;
    }
  } catch (err) {
    error = { message: (err as Error).message, code: (err as NodeJS.ErrnoException).code };
  }
  parentPort!.postMessage({ seq: req.seq, error } satisfies XtsWriteResult);
});
