import { createHmac } from 'node:crypto';
import { openBlobEnvelope, sealBlobEnvelope } from './blob.js';
import { chunkIdToBytes, type ChunkId } from '../chunk-id.js';
import { MAX_CHUNK_SIZE } from './chunking.js';
import { BlobError } from '../errors.js';
import type { LineageKeys } from '../keys.js';

/**
 * The body a changed chunk's pages travel in (pages blobs, below): the pages that differ from the
 * chunk it replaces, or from zeros. A guest writing 4 KiB into a 256 KiB chunk should not cost
 * 256 KiB on a hotel link; the receiver (which holds the base chunk and the lineage keys)
 * rebuilds the chunk, names it (HMAC) and seals it as an ordinary blob.
 *
 * Body: newLength u32 ‖ count u16 ‖ (offset u32, length u32) × count ‖ range bytes. Flag 0x02 was
 * the delta blob of a sender that named its chunks (architecture decision 53): retired, and
 * refused as wrong flags by the envelope.
 */
export const DELTA_PAGE = 4096;
const MAX_RANGES = MAX_CHUNK_SIZE / DELTA_PAGE;
/** Largest body: a full chunk of data plus a full range table. */
export const MAX_DELTA_BODY = MAX_CHUNK_SIZE + 6 + MAX_RANGES * 8;

export interface Range {
  offset: number;
  length: number;
}

/** New content of a chunk at `offset`: one run of pages written since the checkpoint. */
export interface Piece {
  offset: number;
  bytes: Uint8Array;
}

/** Body: newLength u32 ‖ count u16 ‖ (offset u32, length u32) × count ‖ piece bytes. */
function encodeBody(length: number, pieces: readonly Piece[]): Buffer {
  if (length <= 0 || length > MAX_CHUNK_SIZE) throw new RangeError(`chunk length ${length}`);
  if (pieces.length > MAX_RANGES) throw new RangeError(`${pieces.length} ranges (max ${MAX_RANGES})`);
  const dataBytes = pieces.reduce((s, p) => s + p.bytes.length, 0);
  const body = Buffer.allocUnsafe(6 + pieces.length * 8 + dataBytes);
  body.writeUInt32BE(length, 0);
  body.writeUInt16BE(pieces.length, 4);
  let table = 6;
  let data = 6 + pieces.length * 8;
  let prevEnd = 0;
  for (const p of pieces) {
    if (p.bytes.length <= 0 || p.offset < prevEnd || p.offset + p.bytes.length > length) throw new RangeError(`delta range ${p.offset}+${p.bytes.length} is empty, overlapping or outside the chunk`);
    prevEnd = p.offset + p.bytes.length;
    body.writeUInt32BE(p.offset, table);
    body.writeUInt32BE(p.bytes.length, table + 4);
    table += 8;
    data += Buffer.from(p.bytes.buffer, p.bytes.byteOffset, p.bytes.byteLength).copy(body, data);
  }
  return body;
}

/** A decrypted body's chunk length and pieces (views of the body), checked: in order, disjoint, inside the chunk, nothing left over. */
function parseBody(body: Buffer, label: string): { length: number; pieces: Piece[] } {
  const bad = (why: string): never => { throw new BlobError(label, 'delta', why); };
  if (body.length < 6) bad('body too short');
  const length = body.readUInt32BE(0);
  const count = body.readUInt16BE(4);
  if (length === 0 || length > MAX_CHUNK_SIZE) bad(`new chunk length ${length}`);
  if (count > MAX_RANGES || body.length < 6 + count * 8) bad(`range table of ${count} entries does not fit`);
  const pieces: Piece[] = [];
  let data = 6 + count * 8;
  let prevEnd = 0;
  for (let i = 0; i < count; i++) {
    const offset = body.readUInt32BE(6 + i * 8);
    const len = body.readUInt32BE(10 + i * 8);
    if (len === 0 || offset < prevEnd || offset + len > length) bad(`range ${i} (${offset}+${len}) is empty, overlapping or out of bounds`);
    if (data + len > body.length) bad(`range ${i} runs past the data`);
    pieces.push({ offset, bytes: body.subarray(data, data + len) });
    data += len;
    prevEnd = offset + len;
  }
  if (data !== body.length) bad(`${body.length - data} bytes after the last range`);
  return { length, pieces };
}

/**
 * Applies a decrypted body to `base` (read as zeros past its end); throws BlobError naming
 * `label`. With `inPlace` the result is written over `base` when the lengths agree (a caller
 * that owns it saves a chunk-sized allocation and copy).
 */
function applyBody(body: Buffer, base: Uint8Array, label: string, inPlace = false): Buffer {
  const { length, pieces } = parseBody(body, label);
  let out: Buffer;
  if (inPlace && base.length === length) out = Buffer.from(base.buffer, base.byteOffset, length);
  else {
    out = Buffer.allocUnsafe(length);
    const kept = Buffer.from(base.buffer, base.byteOffset, Math.min(base.length, length)).copy(out);
    out.fill(0, kept);
  }
  for (const p of pieces) out.set(p.bytes, p.offset);
  return out;
}

/**
 * Pages blob: a changed chunk the sender has not named. It carries the pages written since the
 * checkpoint (the top layer's allocated ones, read without touching the base) against the
 * checkpoint's chunk at that position, or against zeros where there was none. The receiver
 * rebuilds the chunk and names it (HMAC) itself: the sender never reads the unchanged rest of
 * the chunk. Flag FLAG_PAGES, AAD = header ‖ base ID (32 zero bytes: none).
 */
export const FLAG_PAGES = 0x04;
const NO_BASE = Buffer.alloc(32);
/** The base as pages blobs and fingerprints bind it: its ID's bytes, or 32 zero bytes for none. */
const baseBytes = (baseId: ChunkId | null): Buffer => (baseId ? chunkIdToBytes(baseId) : NO_BASE);

/**
 * zstd level for pages: on bodies of a few 4 KiB pages, level 3 took the same time as level 1
 * here and came out 1.7 % smaller on text-like writes (level 1 lost ≈ 0.4 % to the whole chunk
 * the sender used to pick when smaller).
 */
export const PAGES_ZSTD_LEVEL = 3;

export function sealPages(keys: LineageKeys, baseId: ChunkId | null, length: number, pieces: readonly Piece[]): Buffer {
  return sealBlobEnvelope(keys, encodeBody(length, pieces), FLAG_PAGES, baseBytes(baseId), undefined, PAGES_ZSTD_LEVEL).blob;
}

const FINGERPRINT_TAG = Buffer.from('carryon pages fingerprint v1\0');

/**
 * A keyed digest of what a pages blob carries (base, length, pieces): the name the transfer
 * server gives the rebuilt chunk is a function of exactly these, so a check-in run again can
 * reuse a name it was given for the same fingerprint instead of sending the pages again.
 */
export function pagesFingerprint(idKey: Uint8Array, baseId: ChunkId | null, length: number, pieces: readonly Piece[]): string {
  const h = createHmac('sha256', idKey).update(FINGERPRINT_TAG).update(baseBytes(baseId));
  const head = Buffer.allocUnsafe(8);
  head.writeUInt32BE(length, 0);
  head.writeUInt32BE(pieces.length, 4);
  h.update(head);
  for (const p of pieces) {
    const at = Buffer.allocUnsafe(8);
    at.writeUInt32BE(p.offset, 0);
    at.writeUInt32BE(p.bytes.length, 4);
    h.update(at).update(p.bytes);
  }
  return h.digest('hex');
}

/**
 * Authenticates a pages blob and applies it to the base's plaintext (null: zeros). Errors name
 * `label`. With `inPlace`, the base (the caller's scratch) may hold the result afterwards, or
 * garbage when it throws.
 */
export function openPages(keys: LineageKeys, baseId: ChunkId | null, blob: Uint8Array, basePlain: Uint8Array | null, label: string, inPlace = false): Buffer {
  const body = openBlobEnvelope(keys, blob, FLAG_PAGES, baseBytes(baseId), label, MAX_DELTA_BODY);
  return applyBody(body, basePlain ?? new Uint8Array(0), label, inPlace);
}

/**
 * Authenticates a pages blob against its base and returns what it carries without applying it:
 * the new chunk's length and its pieces (for a holder of the base that writes only those).
 */
export function openPagesPieces(keys: LineageKeys, baseId: ChunkId | null, blob: Uint8Array, label: string): { length: number; pieces: Piece[] } {
  return parseBody(openBlobEnvelope(keys, blob, FLAG_PAGES, baseBytes(baseId), label, MAX_DELTA_BODY), label);
}

/**
 * The pages each chunk has written, from `extents` (sorted, disjoint byte ranges of a disk of
 * `diskSize`): chunk index → ranges relative to the chunk, widened to whole pages, clipped to
 * the chunk, merged. One pass, whatever the number of extents.
 */
export function pagesByChunk(extents: readonly Range[], chunkSize: number, diskSize: number, page = DELTA_PAGE): Map<number, Range[]> {
  const out = new Map<number, Range[]>();
  for (const e of extents) {
    const end = Math.min(e.offset + e.length, diskSize);
    for (let at = e.offset; at < end;) {
      const index = Math.floor(at / chunkSize);
      const start = index * chunkSize;
      const chunkEnd = Math.min(start + chunkSize, diskSize);
      const upto = Math.min(end, chunkEnd);
      const a = Math.floor((at - start) / page) * page;
      const b = Math.min(chunkEnd - start, Math.ceil((upto - start) / page) * page);
      let ranges = out.get(index);
      if (!ranges) out.set(index, (ranges = []));
      const last = ranges[ranges.length - 1];
      if (last && last.offset + last.length >= a) last.length = Math.max(last.length, b - last.offset);
      else ranges.push({ offset: a, length: b - a });
      at = upto;
    }
  }
  return out;
}
