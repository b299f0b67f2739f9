import { CarryonError } from '../core/errors.js';

/**
 * A virtual disk as the NBD server (and anything else) sees it. Offsets and lengths are bytes;
 * callers check ranges against `size` before calling (implementations check again).
 */
export interface BlockDevice {
  readonly size: number;
  readonly readOnly: boolean;
  read(offset: number, length: number): Promise<Buffer>;
  /** With `fua`, the data is durable when the promise resolves. */
  write(offset: number, data: Buffer, fua?: boolean): Promise<void>;
  writeZeroes(offset: number, length: number, fua?: boolean): Promise<void>;
  /** Advisory discard: afterwards the range reads as zeros (our devices make holes). */
  trim(offset: number, length: number): Promise<void>;
  /** Everything written before the call is durable when it resolves. */
  flush(): Promise<void>;
  close(): Promise<void>;
}

export type DiskFailure = 'range' | 'read-only' | 'io' | 'state' | 'closed';

/** A disk operation that failed; `reason` decides the NBD error the client sees. */
export class DiskError extends CarryonError {
  constructor(
    readonly reason: DiskFailure,
    message: string,
  ) {
    super(`disk-${reason}`, message);
  }
}

/** Throws DiskError('range') unless [offset, offset+length) lies within a disk of `size` bytes. */
export function checkRange(size: number, offset: number, length: number): void {
  if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0 || offset + length > size) {
    throw new DiskError('range', `range ${offset}+${length} is outside a disk of ${size} bytes`);
  }
}

/** One piece of a byte range, within one chunk: where it lies in the chunk and in the range. */
export interface ChunkSpan {
  index: number;
  inChunk: number;
  outOff: number;
  len: number;
}

/** Splits [offset, offset + length) at chunk boundaries. */
export function chunkSpans(chunkSize: number, offset: number, length: number): ChunkSpan[] {
  const out: ChunkSpan[] = [];
  const end = offset + length;
  for (let pos = offset; pos < end; ) {
    const index = Math.floor(pos / chunkSize);
    const inChunk = pos - index * chunkSize;
    const len = Math.min(chunkSize - inChunk, end - pos);
    out.push({ index, inChunk, outOff: pos - offset, len });
    pos += len;
  }
  return out;
}
