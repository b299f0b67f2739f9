import { createCipheriv, createDecipheriv, createHmac, randomBytes, type DecipherGCM } from 'node:crypto';
import { compress } from 'zstd-napi';
import { chunkIdToBytes, computeChunkId, type ChunkId } from '../chunk-id.js';
import { MAX_CHUNK_SIZE } from './chunking.js';
import { BlobError } from '../errors.js';
import { dataKeyFor, type LineageKeys } from '../keys.js';
import { decompressBounded, DecompressRefused } from './zstd-bounded.js';

/**
 * Chunk blob, version 2: version(1) ‖ flags(1) ‖ key generation(4) ‖ salt(24) ‖
 * AES-256-GCM(subkey, body) ‖ tag(16), subkey = HKDF-SHA-256(data key of that generation, salt),
 * nonce zero (each subkey seals one blob), body = zstd(plaintext) when that is smaller, else
 * plaintext; AAD = header (with salt) ‖ chunk ID. A random 192-bit salt per blob makes a repeated
 * (key, nonce) pair impossible in practice however many blobs a fleet seals under one lineage
 * key (a random 96-bit nonce under one key is not). The generation lets a lineage rotate its
 * data key for new blobs while old ones stay readable.
 * Version 1 (version ‖ flags ‖ random nonce(12) ‖ GCM under the data key itself) is still read.
 * Made once, then stored, sent and stored again unchanged.
 */
export const BLOB_VERSION = 2;
const V1 = 1;
export const FLAG_ZSTD = 0x01;
const HEADER_V1 = 2;
const NONCE_V1 = 12;
const KEY_ID = 4;
const SALT = 24;
const HEADER = 2 + KEY_ID + SALT;
const TAG = 16;
const ZERO_NONCE = Buffer.alloc(12);
export const BLOB_OVERHEAD = HEADER + TAG;
/** Largest blob a receiver accepts: a raw max-size chunk plus overhead. */
export const MAX_BLOB_SIZE = MAX_CHUNK_SIZE + BLOB_OVERHEAD;

/**
 * A blob's own key: HKDF-SHA256 (RFC 5869) of the data key with the blob's salt and the info
 * "carryon-blob:v2", 32 bytes, so one expand block: PRK = HMAC(salt, key), OKM = HMAC(PRK, info ‖ 0x01).
 * Two HMACs instead of `hkdfSync`, which makes a key object and a crypto job per call and cost twice
 * as much per blob (≈ 17 against 8 µs here; a check-out opens ≈ 2000 blobs per GiB, each on the main
 * thread). test/core/blob-v2.test.ts checks the key against `hkdfSync`.
 */
function subkey(dataKey: Uint8Array, salt: Uint8Array): Buffer {
  const prk = createHmac('sha256', salt).update(dataKey).digest();
  return createHmac('sha256', prk).update(SUBKEY_INFO).digest();
}
/** HKDF's info for blob subkeys, with the expand step's block counter (1) already appended. */
const SUBKEY_INFO = Buffer.from('carryon-blob:v2\x01', 'latin1');
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
  const { blob, compressed } = sealBlobEnvelope(keys, plaintext, 0, chunkIdToBytes(id), into);
  return { id, blob, compressed };
}

/**
 * The envelope shared by chunk blobs and delta blobs (version 2 above), AAD = header ‖
 * `aadTail`. `kindFlags` separates the kinds (a delta can never be opened as a chunk blob, nor
 * the reverse). Seals under the lineage's current data key generation.
 */
export function sealBlobEnvelope(keys: LineageKeys, body: Uint8Array, kindFlags: number, aadTail: Uint8Array, into?: { buffer: Buffer; offset: number }, level = ZSTD_LEVEL): { blob: Buffer; compressed: boolean } {
  const packed = looksCompressible(body) ? compress(body, { compressionLevel: level }) : null;
  const compressed = packed !== null && packed.length < body.length;
  const inner = compressed ? packed : body;
  const header = Buffer.alloc(HEADER);
  header[0] = BLOB_VERSION;
  header[1] = kindFlags | (compressed ? FLAG_ZSTD : 0);
  header.writeUInt32BE(keys.dataKeyId ?? 0, 2);
  randomBytes(SALT).copy(header, 2 + KEY_ID);
  const cipher = createCipheriv('aes-256-gcm', subkey(keys.dataKey, header.subarray(2 + KEY_ID)), ZERO_NONCE);
  cipher.setAAD(Buffer.concat([header, aadTail]));
  const size = HEADER + inner.length + TAG;
  const out = into ? into.buffer.subarray(into.offset, into.offset + size) : Buffer.allocUnsafe(size);
  if (out.length !== size) throw new RangeError(`no room for a ${size}-byte blob at ${into?.offset}`);
  header.copy(out, 0);
  let off = HEADER;
  off += cipher.update(inner).copy(out, off);
  off += cipher.final().copy(out, off);
  cipher.getAuthTag().copy(out, off);
  return { blob: out, compressed };
}

/** Authenticates and decompresses an envelope (version 2, or 1) of kind `kindFlags`; errors name `label` (a chunk ID). */
export function openBlobEnvelope(keys: LineageKeys, blob: Uint8Array, kindFlags: number, aadTail: Uint8Array, label: string, maxBody: number, into?: Buffer): Buffer {
  if (blob.length < HEADER_V1 + NONCE_V1 + TAG) throw new BlobError(label, 'truncated', `${blob.length} bytes`);
  if (blob.length > maxBody + BLOB_OVERHEAD) throw new BlobError(label, 'too-large', `${blob.length} bytes`);
  const version = blob[0];
  if (version !== BLOB_VERSION && version !== V1) throw new BlobError(label, 'version', `version ${blob[0]}`);
  // Version 1 blobs were sealed under generation 0 with a random nonce; the header is version ‖ flags.
  const header = version === V1 ? HEADER_V1 : HEADER;
  const overhead = version === V1 ? HEADER_V1 + NONCE_V1 + TAG : BLOB_OVERHEAD;
  if (blob.length < overhead) throw new BlobError(label, 'truncated', `${blob.length} bytes`);
  if (blob.length > maxBody + overhead) throw new BlobError(label, 'too-large', `${blob.length} bytes`);
  const flags = blob[1]!;
  if ((flags & ~FLAG_ZSTD) !== kindFlags) throw new BlobError(label, 'flags', `flags 0x${flags.toString(16)}`);
  const gen = version === V1 ? 0 : Buffer.from(blob.buffer, blob.byteOffset, blob.byteLength).readUInt32BE(2);
  const dataKey = dataKeyFor(keys, gen);
  if (!dataKey) throw new BlobError(label, 'auth', `sealed under data key generation ${gen}, which this holder does not have`);
  const decipher = version === V1
    ? createDecipheriv('aes-256-gcm', dataKey, blob.subarray(HEADER_V1, HEADER_V1 + NONCE_V1))
    : createDecipheriv('aes-256-gcm', subkey(dataKey, blob.subarray(2 + KEY_ID, HEADER)), ZERO_NONCE);
  decipher.setAAD(Buffer.concat([blob.subarray(0, header), aadTail]));
  decipher.setAuthTag(blob.subarray(blob.length - TAG));
  const sealed = blob.subarray(overhead - TAG, blob.length - TAG);
  let body: Buffer;
  try {
    if (into) {
      // Plain bodies go straight into `into`; compressed ones into this thread's scratch, then decompressed into `into`.
      const target = flags & FLAG_ZSTD ? scratch(sealed.length) : into.length >= sealed.length ? into : Buffer.allocUnsafe(sealed.length);
      body = target.subarray(0, decryptInPieces(decipher, sealed, target));
    } else {
      const head = decipher.update(sealed);
      const tail = decipher.final();
      body = tail.length ? Buffer.concat([head, tail]) : head;
    }
  } catch {
    throw new BlobError(label, 'auth', 'GCM tag does not verify (wrong key, wrong ID, or tampered)');
  }
  if (!(flags & FLAG_ZSTD)) return body;
  // Never more than maxBody bytes, whatever the frame says or holds (decompression bombs).
  try {
    return decompressBounded(body, maxBody, into);
  } catch (err) {
    if (err instanceof DecompressRefused) throw new BlobError(label, err.reason, err.message);
    throw err;
  }
}

/**
 * GCM over `sealed` into `out`, in pieces below glibc's mmap threshold (128 KiB): Node allocates
 * each call's output, and a larger one is an mmap, page faults and munmap every time (on a
 * 256 KiB chunk they cost more CPU than the AES). Nothing in `out` is authentic until `final`
 * returns, and it throws when the tag does not verify.
 */
function decryptInPieces(decipher: DecipherGCM, sealed: Uint8Array, out: Buffer): number {
  let off = 0;
  for (let at = 0; at < sealed.length; at += GCM_PIECE) off += decipher.update(sealed.subarray(at, Math.min(sealed.length, at + GCM_PIECE))).copy(out, off);
  return off + decipher.final().copy(out, off);
}
const GCM_PIECE = 64 * 1024;

/** A buffer of this thread's own for compressed bodies on their way to decompression (reused, grown as needed). */
let scratchBuffer = Buffer.alloc(0);
function scratch(bytes: number): Buffer {
  if (scratchBuffer.length < bytes) scratchBuffer = Buffer.allocUnsafeSlow(Math.max(bytes, MAX_BLOB_SIZE));
  return scratchBuffer;
}

export interface OpenOptions {
  /**
   * Re-check HMAC(idKey, plaintext) = ID (default true). Blobs that crossed a trust boundary
   * (network, import) must be checked; a vault blob that was checked on arrival may skip it on
   * every later read: GCM with AAD = header ‖ ID already proves it is unchanged since sealing.
   */
  checkId?: boolean;
  /**
   * Where to put the plaintext when it has room (a recycled chunk buffer): the result is then a
   * view of it. Saves the allocation of a chunk-sized buffer per blob.
   */
  into?: Buffer;
}

/** Authenticates (GCM), decompresses and re-checks the HMAC; throws BlobError, never returns bad data. */
export function openBlob(keys: LineageKeys, id: ChunkId, blob: Uint8Array, opts: OpenOptions = {}): Buffer {
  const plaintext = openBlobEnvelope(keys, blob, 0, chunkIdToBytes(id), id, MAX_CHUNK_SIZE, opts.into);
  if (opts.checkId !== false && computeChunkId(keys.idKey, plaintext) !== id) throw new BlobError(id, 'id-mismatch', 'HMAC of plaintext differs from ID');
  return plaintext;
}
