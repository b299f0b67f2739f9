import { createCipheriv, createDecipheriv, randomBytes } from 'node:crypto';
import { compress, decompress } from 'zstd-napi';
import { chunkIdToBytes, computeChunkId, type ChunkId } from './chunk-id.js';
import { MAX_CHUNK_SIZE } from './chunking.js';
import { BlobError } from './errors.js';
import type { LineageKeys } from './keys.js';

/**
 * Chunk blob: version(1) ‖ flags(1) ‖ nonce(12) ‖ AES-256-GCM(dataKey, body) ‖ tag(16),
 * body = zstd(plaintext) when that is smaller, else plaintext; AAD = header ‖ chunk ID.
 * Made once, then stored, sent and stored again unchanged.
 */
export const BLOB_VERSION = 1;
export const FLAG_ZSTD = 0x01;
const HEADER = 2;
const NONCE = 12;
const TAG = 16;
export const BLOB_OVERHEAD = HEADER + NONCE + TAG;
/** Largest blob a receiver accepts: a raw max-size chunk plus overhead. */
export const MAX_BLOB_SIZE = MAX_CHUNK_SIZE + BLOB_OVERHEAD;
const ZSTD_LEVEL = 1;

const SAMPLE = 8192;

/**
 * Compressibility probe (as btrfs does): zstd on an 8 KiB sample from the middle of the chunk.
 * Encrypted, compressed or random data fails it and skips the full compression attempt.
 */
function looksCompressible(plaintext: Uint8Array): boolean {
  if (plaintext.length <= 4 * SAMPLE) return true;
  const start = Math.floor((plaintext.length - SAMPLE) / 2);
  const sample = plaintext.subarray(start, start + SAMPLE);
  return compress(sample, { compressionLevel: ZSTD_LEVEL }).length < SAMPLE * 0.97;
}

export interface SealedChunk {
  id: ChunkId;
  blob: Buffer;
  /** Whether zstd shrank the chunk. */
  compressed: boolean;
}

export function sealChunk(keys: LineageKeys, plaintext: Uint8Array, knownId?: ChunkId): SealedChunk {
  const id = knownId ?? computeChunkId(keys.idKey, plaintext);
  const packed = looksCompressible(plaintext) ? compress(plaintext, { compressionLevel: ZSTD_LEVEL }) : null;
  const compressed = packed !== null && packed.length < plaintext.length;
  const body = compressed ? packed : plaintext;
  const header = Buffer.from([BLOB_VERSION, compressed ? FLAG_ZSTD : 0]);
  const nonce = randomBytes(NONCE);
  const cipher = createCipheriv('aes-256-gcm', keys.dataKey, nonce);
  cipher.setAAD(Buffer.concat([header, chunkIdToBytes(id)]));
  const out = Buffer.allocUnsafe(HEADER + NONCE + body.length + TAG);
  header.copy(out, 0);
  nonce.copy(out, HEADER);
  let off = HEADER + NONCE;
  off += cipher.update(body).copy(out, off);
  off += cipher.final().copy(out, off);
  cipher.getAuthTag().copy(out, off);
  return { id, blob: out, compressed };
}

export interface OpenOptions {
  /**
   * Re-check HMAC(idKey, plaintext) = ID (default true). Blobs that crossed a trust boundary
   * (network, import) must be checked; a vault blob that was checked on arrival may skip it on
   * every later read: GCM with AAD = header ‖ ID already proves it is unchanged since sealing.
   */
  checkId?: boolean;
}

/** Authenticates (GCM), decompresses and re-checks the HMAC; throws BlobError, never returns bad data. */
export function openBlob(keys: LineageKeys, id: ChunkId, blob: Uint8Array, opts: OpenOptions = {}): Buffer {
  if (blob.length < BLOB_OVERHEAD) throw new BlobError(id, 'truncated', `${blob.length} bytes`);
  if (blob.length > MAX_BLOB_SIZE) throw new BlobError(id, 'too-large', `${blob.length} bytes`);
  if (blob[0] !== BLOB_VERSION) throw new BlobError(id, 'version', `version ${blob[0]}`);
  const flags = blob[1]!;
  if ((flags & ~FLAG_ZSTD) !== 0) throw new BlobError(id, 'flags', `flags 0x${flags.toString(16)}`);
  const decipher = createDecipheriv('aes-256-gcm', keys.dataKey, blob.subarray(HEADER, HEADER + NONCE));
  decipher.setAAD(Buffer.concat([blob.subarray(0, HEADER), chunkIdToBytes(id)]));
  decipher.setAuthTag(blob.subarray(blob.length - TAG));
  let body: Buffer;
  try {
    const head = decipher.update(blob.subarray(HEADER + NONCE, blob.length - TAG));
    const tail = decipher.final();
    body = tail.length ? Buffer.concat([head, tail]) : head;
  } catch {
    throw new BlobError(id, 'auth', 'GCM tag does not verify (wrong key, wrong ID, or tampered)');
  }
  let plaintext = body;
  if (flags & FLAG_ZSTD) {
    try {
      plaintext = decompress(body);
    } catch (err) {
      throw new BlobError(id, 'decompress', (err as Error).message);
    }
    if (plaintext.length > MAX_CHUNK_SIZE) throw new BlobError(id, 'too-large', `decompresses to ${plaintext.length} bytes`);
  }
  if (opts.checkId !== false && computeChunkId(keys.idKey, plaintext) !== id) throw new BlobError(id, 'id-mismatch', 'HMAC of plaintext differs from ID');
  return plaintext;
}
