import { closeSync, openSync, readSync } from 'node:fs';
import { parentPort, workerData } from 'node:worker_threads';
import { BLOB_OVERHEAD, sealChunk } from '../core/blob.js';
import { isZero } from '../core/chunking.js';
import type { LineageKeys } from '../core/keys.js';

/** Worker: seals chunks of a batch (zero check, HMAC ID, zstd, AES-GCM) off the main thread. */
export interface SealRequest {
  seq: number;
  /** Concatenated plaintext of consecutive chunks, or a range of a raw file to read here. */
  data: ArrayBuffer | { file: string; offset: number; length: number };
  chunkSize: number;
}

export interface SealResult {
  seq: number;
  /** Per chunk: null for a hole, else its ID and blob (blobs packed into one buffer). */
  ids: (string | null)[];
  blobs: ArrayBuffer;
  offsets: number[];
}

const init = workerData as { dataKey: Uint8Array; idKey: Uint8Array };
const keys: LineageKeys = { dataKey: Buffer.from(init.dataKey), idKey: Buffer.from(init.idKey) };

/**
 * Reads a range of a raw image in this thread: no copy through the main thread, no transfer.
 * Opened per range (two syscalls per 4 MiB), so no descriptor outlives the import.
 */
function readRange(r: { file: string; offset: number; length: number }): Buffer {
  const fd = openSync(r.file, 'r');
  try {
    const buf = Buffer.allocUnsafe(r.length);
    for (let got = 0; got < r.length; ) {
      const n = readSync(fd, buf, got, r.length - got, r.offset + got);
      if (n === 0) throw new Error(`${r.file} ended at ${r.offset + got} bytes while importing`);
      got += n;
    }
    return buf;
  } finally {
    closeSync(fd);
  }
}

parentPort!.on('message', (req: SealRequest) => {
  const data = req.data instanceof ArrayBuffer ? Buffer.from(req.data) : readRange(req.data);
  const ids: (string | null)[] = [];
  const offsets: number[] = [0];
  // One transferable buffer for all blobs of the batch (a blob is at most its chunk + overhead).
  const count = Math.ceil(data.length / req.chunkSize);
  const out = Buffer.from(new ArrayBuffer(data.length + count * BLOB_OVERHEAD));
  let total = 0;
  for (let off = 0; off < data.length; off += req.chunkSize) {
    const chunk = data.subarray(off, Math.min(data.length, off + req.chunkSize));
    if (isZero(chunk)) {
      ids.push(null);
    } else {
      const sealed = sealChunk(keys, chunk, undefined, { buffer: out, offset: total });
      ids.push(sealed.id);
      total += sealed.blob.length;
    }
    offsets.push(total);
  }
  const result: SealResult = { seq: req.seq, ids, blobs: out.buffer as ArrayBuffer, offsets };
  parentPort!.postMessage(result, [out.buffer as ArrayBuffer]);
});
