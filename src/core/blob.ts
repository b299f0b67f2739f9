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

/**
 * Seals one chunk. With `into`, the blob is written at `into.offset` of `into.buffer` (which must
 * have room for plaintext + BLOB_OVERHEAD) and `blob` is a view of it: batch sealers save a copy.
 */
export function sealChunk(keys: LineageKeys, plaintext: Uint8Array, knownId?: ChunkId, into?: { buffer: Buffer; offset: number }): SealedChunk {
  const id = knownId ?? computeChunkId(keys.idKey, plaintext);
  const { blob, compressed } = sealBlobEnvelope(keys.dataKey, plaintext, 0, chunkIdToBytes(id), into);
  return { id, blob, compressed };
}

/**
 * The envelope shared by chunk blobs and delta blobs: header(version, flags) ‖ nonce ‖
 * AES-256-GCM(zstd-or-raw(body)) ‖ tag, AAD = header ‖ `aadTail`. `kindFlags` separates the
 * kinds (a delta can never be opened as a chunk blob, nor the reverse).
 */
export function sealBlobEnvelope(dataKey: Uint8Array, body: Uint8Array, kindFlags: number, aadTail: Uint8Array, into?: { buffer: Buffer; offset: number }): { blob: Buffer; compressed: boolean } {
  const packed = looksCompressible(body) ? compress(body, { compressionLevel: ZSTD_LEVEL }) : null;
  const compressed = packed !== null && packed.length < body.length;
  const inner = compressed ? packed : body;
  const header = Buffer.from([BLOB_VERSION, kindFlags | (compressed ? FLAG_ZSTD : 0)]);
  const nonce = randomBytes(NONCE);
  const cipher = createCipheriv('aes-256-gcm', dataKey, nonce);
  cipher.setAAD(Buffer.concat([header, aadTail]));
  const size = HEADER + NONCE + inner.length + TAG;
  const out = into ? into.buffer.subarray(into.offset, into.offset + size) : Buffer.allocUnsafe(size);
  if (out.length !== size) throw new RangeError(`no room for a ${size}-byte blob at ${into?.offset}`);
  header.copy(out, 0);
  nonce.copy(out, HEADER);
  let off = HEADER + NONCE;
  off += cipher.update(inner).copy(out, off);
  off += cipher.final().copy(out, off);
  cipher.getAuthTag().copy(out, off);
  return { blob: out, compressed };
}

/** Authenticates and decompresses an envelope of kind `kindFlags`; errors name `label` (a chunk ID). */
export function openBlobEnvelope(dataKey: Uint8Array, blob: Uint8Array, kindFlags: number, aadTail: Uint8Array, label: string, maxBody: number): Buffer {
  if (blob.length < BLOB_OVERHEAD) throw new BlobError(label, 'truncated', `${blob.length} bytes`);
  if (blob.length > maxBody + BLOB_OVERHEAD) throw new BlobError(label, 'too-large', `${blob.length} bytes`);
  if (blob[0] !== BLOB_VERSION) throw new BlobError(label, 'version', `version ${blob[0]}`);
  const flags = blob[1]!;
  if ((flags & ~FLAG_ZSTD) !== kindFlags) throw new BlobError(label, 'flags', `flags 0x${flags.toString(16)}`);
  const decipher = createDecipheriv('aes-256-gcm', dataKey, blob.subarray(HEADER, HEADER + NONCE));
  decipher.setAAD(Buffer.concat([blob.subarray(0, HEADER), aadTail]));
  decipher.setAuthTag(blob.subarray(blob.length - TAG));
  let body: Buffer;
  try {
    const head = decipher.update(blob.subarray(HEADER + NONCE, blob.length - TAG));
    const tail = decipher.final();
    body = tail.length ? Buffer.concat([head, tail]) : head;
  } catch {
    throw new BlobError(label, 'auth', 'GCM tag does not verify (wrong key, wrong ID, or tampered)');
  }
  if (!(flags & FLAG_ZSTD)) return body;
  let plain: Buffer;
  try {
    plain = decompress(body);
  } catch (err) {
    throw new BlobError(label, 'decompress', (err as Error).message);
  }
  if (plain.length > maxBody) throw new BlobError(label, 'too-large', `decompresses to ${plain.length} bytes`);
  return plain;
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
  const plaintext = openBlobEnvelope(keys.dataKey, blob, 0, chunkIdToBytes(id), id, MAX_CHUNK_SIZE);
  if (opts.checkId !== false && computeChunkId(keys.idKey, plaintext) !== id) throw new BlobError(id, 'id-mismatch', 'HMAC of plaintext differs from ID');
  return plaintext;
}
