import { openBlob, sealChunk } from '../core/blob.js';
import type { ChunkId } from '../core/chunk-id.js';
import { openDelta } from '../core/delta.js';
import type { LineageKeys } from '../core/keys.js';

/** Authenticates a pushed blob: GCM under the lineage key, then the HMAC of its plaintext against `id`. */
export function verifyPushed(keys: LineageKeys, id: ChunkId, blob: Uint8Array): void {
  openBlob(keys, id, blob);
}

/**
 * The blob to store for a pushed delta: applied to the base chunk's stored blob, checked against
 * `id`, sealed. The stored base was verified when it arrived, so its ID is not hashed again.
 */
export function rebuildPushed(keys: LineageKeys, id: ChunkId, delta: Uint8Array, base: { id: ChunkId; blob: Uint8Array }): Buffer {
  const basePlain = openBlob(keys, base.id, base.blob, { checkId: false });
  return sealChunk(keys, openDelta(keys, id, base.id, delta, basePlain), id).blob;
}
