import { createHmac } from 'node:crypto';
import { ValidationError } from './errors.js';

/** Chunk ID: lowercase hex of HMAC-SHA-256(idKey, plaintext). Keyed, so a store learns nothing from it. */
export type ChunkId = string;

export const CHUNK_ID_BYTES = 32;
const ID_RE = /^[0-9a-f]{64}$/;

export function computeChunkId(idKey: Uint8Array, plaintext: Uint8Array): ChunkId {
  return createHmac('sha256', idKey).update(plaintext).digest('hex');
}

export function isChunkId(value: unknown): value is ChunkId {
  return typeof value === 'string' && ID_RE.test(value);
}

/** Validates an ID from outside (network, file names, JSON) before it reaches a path or a query. */
export function parseChunkId(value: unknown): ChunkId {
  if (!isChunkId(value)) throw new ValidationError(`not a chunk ID (64 lowercase hex digits): ${String(value).slice(0, 80)}`);
  return value;
}

export function chunkIdToBytes(id: ChunkId): Buffer {
  return Buffer.from(parseChunkId(id), 'hex');
}

export function chunkIdFromBytes(bytes: Uint8Array): ChunkId {
  if (bytes.length !== CHUNK_ID_BYTES) throw new ValidationError(`chunk ID must be ${CHUNK_ID_BYTES} bytes, got ${bytes.length}`);
  return Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength).toString('hex');
}
