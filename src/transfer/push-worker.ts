import { parentPort } from 'node:worker_threads';
import type { ChunkId } from '../core/chunk-id.js';
import { decodeLineageKeys, type LineageKeys } from '../core/keys.js';
import { exactBuffer, type PoolReply } from '../core/worker-pool.js';
import { rebuildPushed, verifyPushed } from './push-rebuild.js';

/** Worker: authenticates a pushed blob, or rebuilds a changed chunk from its delta and seals it. */
export interface PushCheckRequest {
  seq: number;
  /** The job's lineage keys (encodeLineageKeys). */
  keys: string;
  id: ChunkId;
  /** The pushed blob, or the delta blob (ownership moves here). */
  payload: ArrayBuffer;
  /** For a delta: the base chunk and its stored blob. */
  base?: { id: ChunkId; blob: ArrayBuffer };
}

export interface PushCheckReply extends PoolReply {
  /** For a delta: the rebuilt chunk's blob, to store. */
  blob?: ArrayBuffer;
}

/** Decoded keys of the jobs seen lately (a few per transfer server at a time). */
const keyCache = new Map<string, LineageKeys>();
function keysOf(encoded: string): LineageKeys {
  let keys = keyCache.get(encoded);
  if (!keys) {
    if (keyCache.size >= 64) keyCache.delete(keyCache.keys().next().value!);
    keys = decodeLineageKeys(encoded);
    keyCache.set(encoded, keys);
  }
  return keys;
}

parentPort!.on('message', (req: PushCheckRequest) => {
  let reply: PushCheckReply;
  const transfer: ArrayBuffer[] = [];
  try {
    const keys = keysOf(req.keys);
    const payload = new Uint8Array(req.payload);
    if (!req.base) {
      verifyPushed(keys, req.id, payload);
      reply = { seq: req.seq };
    } else {
      const sealed = rebuildPushed(keys, req.id, payload, { id: req.base.id, blob: new Uint8Array(req.base.blob) });
      // A blob of a few KiB may be a view of Node's shared pool: exactBuffer copies it then.
      const blob = exactBuffer(sealed);
      reply = { seq: req.seq, blob };
      transfer.push(blob);
    }
  } catch (err) {
    reply = { seq: req.seq, error: { message: (err as Error).message } };
  }
  parentPort!.postMessage(reply, transfer);
});
