import { parentPort } from 'node:worker_threads';
import type { ChunkId } from '../core/chunk-id.js';
import { decodeLineageKeys, type LineageKeys } from '../core/keys.js';
import { exactBuffer, type PoolReply } from '../core/worker-pool.js';
import { namePushed, rebuildPushed, verifyPushed } from './push-rebuild.js';

/**
 * Worker: authenticates a pushed blob (verify), rebuilds a changed chunk from its delta and seals
 * it (rebuild), or rebuilds one from a pages blob and names it (name).
 */
export interface PushCheckRequest {
  seq: number;
  kind: 'verify' | 'rebuild' | 'name';
  /** The job's lineage keys (encodeLineageKeys). */
  keys: string;
  /** The chunk's ID (verify, rebuild), or how errors name it (name). */
  id: string;
  /** The pushed blob, delta blob or pages blob (ownership moves here). */
  payload: ArrayBuffer;
  /** The base chunk and its stored blob (rebuild; name, where there is one). */
  base?: { id: ChunkId; blob: ArrayBuffer };
}

export interface PushCheckReply extends PoolReply {
  /** The blob to store (rebuild; name, unless nothing new). */
  blob?: ArrayBuffer;
  /** The rebuilt chunk's ID (name; null: zeros). */
  named?: ChunkId | null;
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
    const base = req.base ? { id: req.base.id, blob: new Uint8Array(req.base.blob) } : null;
    let sealed: Buffer | null = null;
    reply = { seq: req.seq };
    if (req.kind === 'verify') verifyPushed(keys, req.id, payload);
    else if (req.kind === 'rebuild') {
      if (!base) throw new Error('a delta needs its base');
      sealed = rebuildPushed(keys, req.id, payload, base);
    } else {
      const named = namePushed(keys, payload, base, req.id);
      reply.named = named.id;
      sealed = named.blob;
    }
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
