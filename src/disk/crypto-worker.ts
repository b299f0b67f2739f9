import { parentPort, workerData } from 'node:worker_threads';
import { openBlob, sealChunk } from '../core/blob.js';
import { BlobError } from '../core/errors.js';
import type { LineageKeys } from '../core/keys.js';

/** Worker: opens (decrypt, decompress, verify) or seals one chunk blob off the main thread. */
export type CryptoRequest =
  | { seq: number; op: 'open'; id: string; blob: ArrayBuffer; checkId: boolean }
  | { seq: number; op: 'seal'; plain: ArrayBuffer };

export type CryptoReply =
  | { seq: number; ok: true; id: string; data: ArrayBuffer }
  | { seq: number; ok: false; message: string; blobReason?: BlobError['reason']; id?: string };

const init = workerData as { dataKey: Uint8Array; idKey: Uint8Array };
const keys: LineageKeys = { dataKey: Buffer.from(init.dataKey), idKey: Buffer.from(init.idKey) };

/** An ArrayBuffer holding exactly `b` (no copy when `b` already owns its whole buffer). */
function own(b: Buffer): ArrayBuffer {
  if (b.byteOffset === 0 && b.byteLength === b.buffer.byteLength) return b.buffer as ArrayBuffer;
  return b.buffer.slice(b.byteOffset, b.byteOffset + b.byteLength) as ArrayBuffer;
}

parentPort!.on('message', (req: CryptoRequest) => {
  let reply: CryptoReply;
  try {
    if (req.op === 'open') {
      reply = { seq: req.seq, ok: true, id: req.id, data: own(openBlob(keys, req.id, Buffer.from(req.blob), { checkId: req.checkId })) };
    } else {
      const sealed = sealChunk(keys, Buffer.from(req.plain));
      reply = { seq: req.seq, ok: true, id: sealed.id, data: own(sealed.blob) };
    }
  } catch (err) {
    const e = err as Error;
    reply = { seq: req.seq, ok: false, message: e.message, ...(e instanceof BlobError ? { blobReason: e.reason, id: e.chunkId } : {}) };
  }
  parentPort!.postMessage(reply, reply.ok ? [reply.data] : []);
});
