import { openBlob, sealChunk } from '../core/chunks/blob.js';
import { computeChunkId, type ChunkId } from '../core/chunk-id.js';
import { isZero } from '../core/chunks/chunking.js';
import { openPages } from '../core/chunks/delta.js';
import type { LineageKeys } from '../core/keys.js';

/** A pushed chunk named here: its ID (null: it reads as zeros, a hole) and the blob to store (null: nothing new). */
export interface Named {
  id: ChunkId | null;
  blob: Buffer | null;
}

/**
 * Rebuilds a chunk from a pages blob and its base (the checkpoint chunk's stored blob, or none:
 * zeros) and names it: HMAC of the result. A chunk rebuilt to its base's bytes is no change; one
 * of zeros is a hole; anything else is sealed under its new ID.
 */
export function namePushed(keys: LineageKeys, pages: Uint8Array, base: { id: ChunkId; blob: Uint8Array } | null, label: string): Named {
  const basePlain = base ? openBlob(keys, base.id, base.blob, { checkId: false }) : null;
  const plain = openPages(keys, base?.id ?? null, pages, basePlain, label, true);
  if (isZero(plain)) return { id: null, blob: null };
  const id = computeChunkId(keys.idKey, plain);
  if (id === base?.id) return { id, blob: null };
  return { id, blob: sealChunk(keys, plain, id).blob };
}
