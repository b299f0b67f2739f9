import { ValidationError } from '../errors.js';

export const KiB = 1024;
export const MiB = 1024 * KiB;
export const GiB = 1024 * MiB;

export const DEFAULT_CHUNK_SIZE = 256 * KiB;
export const MIN_CHUNK_SIZE = 64 * KiB;
export const MAX_CHUNK_SIZE = 4 * MiB;

/** Throws unless `size` is a power of two within [64 KiB, 4 MiB]. */
export function validateChunkSize(size: number): number {
  if (!Number.isInteger(size) || size < MIN_CHUNK_SIZE || size > MAX_CHUNK_SIZE || (size & (size - 1)) !== 0) {
    throw new ValidationError(
      `chunk size ${size} is not a power of two between ${MIN_CHUNK_SIZE} and ${MAX_CHUNK_SIZE} bytes`,
    );
  }
  return size;
}

export function validateDiskSize(size: number): number {
  if (!Number.isSafeInteger(size) || size < 0) throw new ValidationError(`disk size ${size} is not a non-negative integer`);
  return size;
}

export function chunkCount(diskSize: number, chunkSize: number): number {
  return Math.ceil(diskSize / chunkSize);
}

/** Length of chunk `index`: chunkSize except for a shorter last chunk. */
export function chunkLength(index: number, diskSize: number, chunkSize: number): number {
  const start = index * chunkSize;
  if (index < 0 || start >= diskSize) throw new ValidationError(`chunk index ${index} is outside a disk of ${diskSize} bytes`);
  return Math.min(chunkSize, diskSize - start);
}

const ZEROS = Buffer.alloc(MAX_CHUNK_SIZE);

/** True when every byte is zero (a hole: never stored, never sent). memcmp-speed. */
export function isZero(buf: Uint8Array): boolean {
  for (let off = 0; off < buf.length; off += ZEROS.length) {
    const part = buf.subarray(off, Math.min(buf.length, off + ZEROS.length));
    if (Buffer.compare(part, ZEROS.subarray(0, part.length)) !== 0) return false;
  }
  return true;
}

/** Splits a buffer into chunk-sized views (no copy); the last one may be short. */
export function* splitChunks(buf: Buffer, chunkSize: number): Generator<Buffer> {
  for (let off = 0; off < buf.length; off += chunkSize) yield buf.subarray(off, Math.min(buf.length, off + chunkSize));
}
