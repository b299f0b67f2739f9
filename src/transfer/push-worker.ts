import { parentPort, workerData } from 'node:worker_threads';
import type { ChunkId } from '../core/chunk-id.js';
import { decodeLineageKeys, type LineageKeys } from '../core/keys.js';
import { exactBuffer, type PoolReply } from '../core/worker-pool.js';
import { idleThisThread } from './idle-thread.js';
import { namePushed } from './push-rebuild.js';

/** Worker: rebuilds a changed chunk from a pages blob and its base, and names and seals it. */
export interface PushCheckRequest {
  seq: number;
  /** The job's lineage keys (encodeLineageKeys). */
  keys: string;
  /** How errors name the chunk. */
  id: string;
  /** The pages blob (ownership moves here). */
  payload: ArrayBuffer;
  /** The base chunk and its stored blob, where there is one. */
  base?: { id: ChunkId; blob: ArrayBuffer };
}

export interface PushCheckReply extends PoolReply {
  /** The blob to store, unless nothing new. */
  blob?: ArrayBuffer;
  /** The rebuilt chunk's ID (null: zeros). */
  named?: ChunkId | null;
}

/** What the pool tells its threads: `idle` for the background replicas' lane. */
export interface PushWorkerData {
  idle?: boolean;
}

if ((workerData as PushWorkerData | null)?.idle) idleThisThread();

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
    const base = req.base ? { id: req.base.id, blob: new Uint8Array(req.base.blob) } : null;
    const named = namePushed(keys, payload, base, req.id);
    reply = { seq: req.seq, named: named.id };
    const sealed = named.blob;
    if (sealed) {
      // A blob of a few KiB may be a view of Node's shared pool: exactBuffer copies it then.
      const blob = exactBuffer(sealed);
      reply.blob = blob;
      transfer.push(blob);
    }
  } catch (err) {
    reply = { seq: req.seq, error: { message: (err as Error).message } };
  }
  parentPort!.postMessage(reply, transfer);
});
