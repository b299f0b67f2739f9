import { createHash, createHmac, timingSafeEqual } from 'node:crypto';
import { chunkIdFromBytes, chunkIdToBytes, type ChunkId } from '../chunk-id.js';
import { BlobError } from '../errors.js';
import type { LineageKeys } from '../keys.js';
import { BLOB_OVERHEAD, MAX_BLOB_SIZE } from './blob.js';
import { DELTA_PAGE, MAX_DELTA_BODY, openPagesPieces, type Piece } from './delta.js';

/**
 * A delta record: how chunk Y was made from chunk X, kept by the transfer server beside Y so that
 * a laptop still holding X (a parked copy) fetches only the pages that differ and writes only
 * those (architecture decision 66). It is the pages blob a check-in sent for Y (sealed by the
 * laptop under the lineage keys, its AAD binding X), kept as it arrived, plus a MAC the server
 * adds binding that blob to the pair (X, Y): the blob alone says nothing about Y, so without the
 * MAC whoever can write the store could pair Y with another valid pages blob against X.
 *
 * Record: version u8 ‖ base X (32) ‖ MAC (32) ‖ pages blob. MAC = HMAC-SHA-256(idKey, tag ‖ X ‖
 * Y ‖ blob length u32 ‖ blob header ‖ GCM tag): GCM already authenticates the blob's bytes under
 * its key, so its header (salt) and tag stand for them, and the MAC costs no pass over the data.
 * Stored under `deltaRecordId(Y)`: one record per chunk (the first check-in that made it), found
 * without an index, and kept by GC exactly as long as Y is. Pages written over a hole are kept
 * against `ZERO_BASE`: a laptop whose copy has a hole there gets them instead of Y's blob (fewer
 * bytes: pages travel at zstd level 3, rebuilt chunks are sealed at level 1).
 */
export const DELTA_RECORD_VERSION = 1;
/** The base of pages written over zeros (a chunk that was a hole): a record against it makes the whole chunk from zeros and the pages. */
export const ZERO_BASE: ChunkId = '0'.repeat(64);
const HEAD = 1 + 32 + 32;
/** The blob's header and tag sizes in the version-2 envelope (core/chunks/blob.ts). */
const BLOB_HEADER = BLOB_OVERHEAD - 16;
const BLOB_TAG = 16;
export const MAX_DELTA_RECORD = HEAD + MAX_DELTA_BODY + BLOB_OVERHEAD;
const ID_TAG = Buffer.from('carryon delta record id v1\0');
const MAC_TAG = Buffer.from('carryon delta record mac v1\0');

/** Where Y's record is stored: a name no chunk ID takes (chunk IDs are keyed HMACs; this is a tagged hash of one). */
export function deltaRecordId(newId: ChunkId): ChunkId {
  return createHash('sha256').update(ID_TAG).update(chunkIdToBytes(newId)).digest('hex');
}

function recordMac(idKey: Uint8Array, baseId: ChunkId, newId: ChunkId, pages: Uint8Array): Buffer {
  const len = Buffer.allocUnsafe(4);
  len.writeUInt32BE(pages.length, 0);
  return createHmac('sha256', idKey).update(MAC_TAG).update(chunkIdToBytes(baseId)).update(chunkIdToBytes(newId)).update(len)
    .update(pages.subarray(0, BLOB_HEADER)).update(pages.subarray(pages.length - BLOB_TAG)).digest();
}

/** The record for Y made by `pages` (a pages blob against X, checked by the caller: it rebuilt Y from it). */
export function makeDeltaRecord(keys: LineageKeys, baseId: ChunkId, newId: ChunkId, pages: Uint8Array): Buffer {
  if (pages.length < BLOB_OVERHEAD || pages[0] !== 2) throw new RangeError('a delta record keeps a version-2 pages blob');
  const out = Buffer.allocUnsafe(HEAD + pages.length);
  out[0] = DELTA_RECORD_VERSION;
  chunkIdToBytes(baseId).copy(out, 1);
  recordMac(keys.idKey, baseId, newId, pages).copy(out, 33);
  out.set(pages, HEAD);
  return out;
}

/** The base a record was made against (unauthenticated: the server's choice whether to send it; the receiver checks). */
export function deltaRecordBase(record: Uint8Array): ChunkId | null {
  if (record.length < HEAD + BLOB_OVERHEAD || record.length > MAX_DELTA_RECORD || record[0] !== DELTA_RECORD_VERSION) return null;
  return chunkIdFromBytes(record.subarray(1, 33));
}

/**
 * Authenticates a record for (X → Y) and returns the pages to write over X to make Y: the MAC
 * (the pair), then GCM (the pages, against X). Throws BlobError naming Y; never returns bad data.
 */
export function openDeltaRecord(keys: LineageKeys, baseId: ChunkId, newId: ChunkId, record: Uint8Array): { length: number; pieces: Piece[] } {
  const bad = (why: string): never => { throw new BlobError(newId, 'delta', why); };
  if (record.length < HEAD + BLOB_OVERHEAD || record.length > MAX_DELTA_RECORD) bad(`delta record of ${record.length} bytes`);
  if (record[0] !== DELTA_RECORD_VERSION) bad(`delta record version ${record[0]}`);
  if (chunkIdFromBytes(record.subarray(1, 33)) !== baseId) bad('delta record made against another chunk');
  const pages = record.subarray(HEAD);
  const mac = Buffer.from(record.buffer, record.byteOffset + 33, 32);
  if (!timingSafeEqual(recordMac(keys.idKey, baseId, newId, pages), mac)) bad('delta record MAC does not verify (not made for this pair, or tampered)');
  return openPagesPieces(keys, baseId, pages, newId);
}

/**
 * Whether a record is worth keeping: it is smaller than Y's own blob (what it saves a holder of
 * the base on every check-out; the pages are sealed at zstd level 3, a rebuilt chunk at level 1).
 */
export function deltaWorthKeeping(pagesLength: number, newBlobLength: number): boolean {
  return pagesLength + HEAD < newBlobLength;
}

/**
 * A chain of records, for a copy parked further back: X → Y1 → … → Y, oldest first, each step's
 * new chunk named (the MACs bind each pair, so the names are checked, not trusted). Payload:
 * count u8 ‖ (new ID 32 ‖ record length u32 ‖ record) × count. The receiver writes the pages of
 * every step, later ones over earlier ones, as one set.
 */
export const MAX_CHAIN = 4;
export const MAX_DELTA_CHAIN = 1 + MAX_CHAIN * 36 + MAX_BLOB_SIZE;

export function encodeDeltaChain(steps: readonly { newId: ChunkId; record: Uint8Array }[]): Buffer {
  if (steps.length < 2 || steps.length > MAX_CHAIN) throw new RangeError(`a chain of ${steps.length} records`);
  const out = Buffer.allocUnsafe(1 + steps.reduce((n, st) => n + 36 + st.record.length, 0));
  out[0] = steps.length;
  let at = 1;
  for (const st of steps) {
    at += chunkIdToBytes(st.newId).copy(out, at);
    out.writeUInt32BE(st.record.length, at);
    out.set(st.record, at + 4);
    at += 4 + st.record.length;
  }
  return out;
}

/** Authenticates every step of a chain from `baseId` to `newId` and returns the pages that make `newId` from `baseId`. */
export function openDeltaChain(keys: LineageKeys, baseId: ChunkId, newId: ChunkId, payload: Uint8Array): { length: number; pieces: Piece[] } {
  const bad = (why: string): never => { throw new BlobError(newId, 'delta', why); };
  const buf = Buffer.from(payload.buffer, payload.byteOffset, payload.byteLength);
  const count = buf.length > 0 ? buf[0]! : 0;
  if (count < 2 || count > MAX_CHAIN) bad(`a chain of ${count} records`);
  let at = 1;
  let from = baseId;
  let length = 0;
  const steps: Piece[][] = [];
  for (let i = 0; i < count; i++) {
    if (at + 36 > buf.length) bad('chain cut short');
    const to = chunkIdFromBytes(buf.subarray(at, at + 32));
    const len = buf.readUInt32BE(at + 32);
    if (at + 36 + len > buf.length) bad('chain cut short');
    const opened = openDeltaRecord(keys, from, to, buf.subarray(at + 36, at + 36 + len));
    if (i > 0 && opened.length !== length) bad('the chain changes the chunk\'s length');
    length = opened.length;
    steps.push(opened.pieces);
    from = to;
    at += 36 + len;
  }
  if (at !== buf.length) bad(`${buf.length - at} bytes after the chain`);
  if (from !== newId) bad('the chain ends at another chunk');
  return { length, pieces: overlay(steps, length) };
}

/** Pieces of several steps as one set: whole pages, a later step's over an earlier one's, sorted, adjacent ones joined. */
function overlay(steps: readonly Piece[][], length: number): Piece[] {
  const pages = new Map<number, Uint8Array>();
  for (const pieces of steps) {
    for (const p of pieces) {
      for (let o = 0; o < p.bytes.length; o += DELTA_PAGE) {
        // Pages start on page boundaries (pagesByChunk); a piece not on one is kept whole under its offset.
        pages.set(p.offset + o, p.bytes.subarray(o, Math.min(p.bytes.length, o + DELTA_PAGE)));
      }
    }
  }
  const runs: { offset: number; end: number; parts: Uint8Array[] }[] = [];
  for (const offset of [...pages.keys()].sort((a, b) => a - b)) {
    const bytes = pages.get(offset)!;
    if (offset + bytes.length > length) throw new BlobError('chain', 'delta', `a page at ${offset} runs past the chunk`);
    const last = runs[runs.length - 1];
    if (last && last.end > offset) throw new BlobError('chain', 'delta', `pages at ${last.end} and ${offset} overlap`);
    if (last && last.end === offset) {
      last.parts.push(bytes);
      last.end += bytes.length;
    } else runs.push({ offset, end: offset + bytes.length, parts: [bytes] });
  }
  return runs.map((r) => ({ offset: r.offset, bytes: r.parts.length === 1 ? r.parts[0]! : Buffer.concat(r.parts) }));
}
