import { createCipheriv, hkdfSync, randomBytes } from 'node:crypto';
import { FLAG_ZSTD } from '../../src/core/chunks/blob.js';
import { chunkIdToBytes, type ChunkId } from '../../src/core/chunk-id.js';
import { FLAG_PAGES } from '../../src/core/chunks/delta.js';
import type { LineageKeys } from '../../src/core/keys.js';

/**
 * Hand-made zstd frames for attacks on decompression (RFC 8878 §3.1.1): what a user holding
 * their desktop's lineage keys could put inside an authentic blob envelope.
 */
const MAGIC = Buffer.from([0x28, 0xb5, 0x2f, 0xfd]);
/** An RLE block regenerates up to 128 KiB from one byte (3-byte block header + 1). */
export const RLE_BLOCK = 128 * 1024;

export interface BombShape {
  /** RLE blocks of RLE_BLOCK bytes each (the output is blocks × 128 KiB). */
  blocks: number;
  /** Frame content size to declare: 'true' (the real output), a lie (a number), or none. */
  declare?: 'true' | 'none' | number;
  /** The byte each block repeats. */
  byte?: number;
}

/** One zstd frame of RLE blocks: ≈ 4 bytes in, 128 KiB out per block. */
export function rleBomb({ blocks, declare = 'none', byte = 0 }: BombShape): Buffer {
  const size = declare === 'true' ? blocks * RLE_BLOCK : declare === 'none' ? null : declare;
  const head = 4 + 2 + (size === null ? 0 : 8);
  const out = Buffer.alloc(head + blocks * 4);
  MAGIC.copy(out, 0);
  // Descriptor: FCS_Field_Size flag 3 (8 bytes) or 0 (none, not single-segment); window 128 KiB (exponent 7).
  out[4] = size === null ? 0x00 : 0xc0;
  out[5] = 7 << 3;
  if (size !== null) out.writeBigUInt64LE(BigInt(size), 6);
  for (let i = 0, at = head; i < blocks; i++, at += 4) {
    const last = i === blocks - 1 ? 1 : 0;
    out.writeUIntLE(last | (1 << 1) | (RLE_BLOCK << 3), at, 3);
    out[at + 3] = byte;
  }
  return out;
}

/**
 * A version-2 blob envelope around `inner` taken as is (flag zstd set): the blob sealer would
 * compress the body itself, an attacker need not.
 */
export function sealRawEnvelope(keys: LineageKeys, inner: Uint8Array, kindFlags: number, aadTail: Uint8Array): Buffer {
  const header = Buffer.alloc(30);
  header[0] = 2;
  header[1] = kindFlags | FLAG_ZSTD;
  header.writeUInt32BE(keys.dataKeyId ?? 0, 2);
  randomBytes(24).copy(header, 6);
  const subkey = Buffer.from(hkdfSync('sha256', keys.dataKey, header.subarray(6), 'carryon-blob:v2', 32));
  const cipher = createCipheriv('aes-256-gcm', subkey, Buffer.alloc(12));
  cipher.setAAD(Buffer.concat([header, aadTail]));
  return Buffer.concat([header, cipher.update(inner), cipher.final(), cipher.getAuthTag()]);
}

/** A pages blob (no base: zeros) whose compressed body is `inner`. */
export function rawPagesBlob(keys: LineageKeys, inner: Uint8Array, baseId: ChunkId | null = null): Buffer {
  return sealRawEnvelope(keys, inner, FLAG_PAGES, baseId ? chunkIdToBytes(baseId) : Buffer.alloc(32));
}

/** A chunk blob for `id` whose compressed body is `inner`. */
export function rawChunkBlob(keys: LineageKeys, id: ChunkId, inner: Uint8Array): Buffer {
  return sealRawEnvelope(keys, inner, 0, chunkIdToBytes(id));
}

/** A seeded PRNG (mulberry32): a fuzz run that fails can be replayed from its seed. */
export function seeded(seed: number): { int(n: number): number; pick<T>(xs: readonly T[]): T; bytes(n: number): Buffer } {
  let a = seed >>> 0;
  const next = (): number => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
  const int = (n: number): number => Math.floor(next() * n);
  return {
    int,
    pick: (xs) => xs[int(xs.length)]!,
    bytes: (n) => {
      const out = Buffer.allocUnsafe(n);
      for (let i = 0; i < n; i++) out[i] = int(256);
      return out;
    },
  };
}

export type Rand = ReturnType<typeof seeded>;

/** A declared frame content size field: 1, 2, 4 or 8 bytes (RFC 8878 §3.1.1.1.4), any value. */
export function withDeclaredSize(frame: Buffer, size: number, rand: Rand): Buffer {
  // Rebuild the header: FCS flag 3 (8 bytes), not single-segment, window 128 KiB; blocks as they were.
  const descriptor = frame[4]!;
  const fcsFlag = descriptor >> 6;
  const single = (descriptor >> 5) & 1;
  const dictFlag = descriptor & 3;
  const fcsBytes = [single ? 1 : 0, 2, 4, 8][fcsFlag]!;
  const headerLen = 4 + 1 + (single ? 0 : 1) + [0, 1, 2, 4][dictFlag]! + fcsBytes;
  const blocks = frame.subarray(headerLen);
  const head = Buffer.alloc(4 + 1 + 1 + 8);
  frame.copy(head, 0, 0, 4);
  head[4] = 0xc0 | (descriptor & 0x04);
  head[5] = rand.pick([7 << 3, 10 << 3, 17 << 3, 31 << 3]);
  head.writeBigUInt64LE(BigInt(size), 6);
  return Buffer.concat([head, blocks]);
}
