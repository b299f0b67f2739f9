import { closeSync, openSync, readSync } from 'node:fs';
import { parentPort, workerData } from 'node:worker_threads';
import { BLOB_OVERHEAD, sealChunk } from '../core/chunks/blob.js';
import { isZero } from '../core/chunks/chunking.js';
import { decodeLineageKeys, type LineageKeys } from '../core/keys.js';

/** Worker: seals chunks of a batch (zero check, HMAC ID, zstd, AES-GCM) off the main thread. */
/** A batch's blob buffer handed back once its blobs are stored, for the next batch to reuse. */
export interface RecycleRequest {
  recycle: ArrayBuffer;
}

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

const init = workerData as { keys: string };
const keys: LineageKeys = decodeLineageKeys(init.keys);

/**
 * Reads a range of a raw image in this thread: no copy through the main thread, no transfer.
 * Opened per range (two syscalls per 4 MiB), so no descriptor outlives the import.
 */
let readBuf: Buffer | null = null;
function readRange(r: { file: string; offset: number; length: number }): Buffer {
  const fd = openSync(r.file, 'r');
  try {
    // One read buffer for the worker's life: each batch is sealed before the next is read.
    if (!readBuf || readBuf.length < r.length) readBuf = Buffer.allocUnsafe(r.length);
    const buf = readBuf.subarray(0, r.length);
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

/**
 * Output buffers come back from the main thread after their blobs are stored: a steady set of
 * buffers instead of a new 4 MiB ArrayBuffer per batch, whose external-memory growth would
 * force full garbage collections of the (much larger) main thread heap.
 */
const spare: ArrayBuffer[] = [];
function outputBuffer(size: number): Buffer {
  const i = spare.findIndex((b) => b.byteLength >= size);
  return Buffer.from(i >= 0 ? spare.splice(i, 1)[0]! : new ArrayBuffer(size));
}

parentPort!.on('message', (msg: SealRequest | RecycleRequest) => {
  if ('recycle' in msg) {
    if (spare.length < 4) spare.push(msg.recycle);
    return;
  }
  const req = msg;
  const data = req.data instanceof ArrayBuffer ? Buffer.from(req.data) : readRange(req.data);
  const ids: (string | null)[] = [];
  const offsets: number[] = [0];
  // One transferable buffer for all blobs of the batch (a blob is at most its chunk + overhead).
  const count = Math.ceil(data.length / req.chunkSize);
  const out = outputBuffer(data.length + count * BLOB_OVERHEAD);
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
