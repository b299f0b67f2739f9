/**
 * Extended L2 entries (qcow2 incompatible feature bit 4): each cluster is 32 subclusters, its
 * entry's second word an "allocated" bit (0–31) and a "reads as zeros" bit (32–63) per
 * subcluster. A base layer with them can take a chunk's changed pages over a hole without
 * writing (and encrypting) the zeros around them: only the touched subclusters are written, the
 * others are marked zero. Pure: no I/O.
 */
import type { Piece } from '../../core/chunks/delta.js';

export const SUBCLUSTERS = 32;
/** Every subcluster allocated, none marked zero: a cluster written whole. */
export const ALL_ALLOCATED = 0xffff_ffffn;

/** The bitmap word of a cluster whose `allocated` subclusters hold data and the rest read as zeros. */
export function bitmapOf(allocated: number): bigint {
  const alloc = BigInt(allocated >>> 0);
  return alloc | ((~alloc & ALL_ALLOCATED) << 32n);
}

/** The allocated subclusters of a bitmap word. */
export const allocatedOf = (bitmap: bigint): number => Number(bitmap & ALL_ALLOCATED) >>> 0;

/** The subclusters (of `subcluster` bytes) that `pieces` touch, as a 32-bit mask. */
export function touchedSubclusters(pieces: readonly Piece[], subcluster: number): number {
  let mask = 0;
  for (const p of pieces) {
    if (p.bytes.length === 0) continue;
    const first = Math.floor(p.offset / subcluster);
    const last = Math.floor((p.offset + p.bytes.length - 1) / subcluster);
    for (let k = first; k <= last; k++) mask |= 1 << k;
  }
  return mask >>> 0;
}

/**
 * `pieces` (sorted, disjoint, within the cluster) rewritten so that every subcluster in `whole`
 * is written whole: zeros where no piece covers it (its old bytes are not there to keep: a hole,
 * or a subcluster that reads as zeros). Pieces outside `whole` stay as they are (views, not
 * copies). Sorted and disjoint; the offsets of what `whole` adds are subcluster-aligned.
 */
export function coverSubclusters(pieces: readonly Piece[], whole: number, subcluster: number): Piece[] {
  const runs: { start: number; end: number }[] = [];
  for (let k = 0; k < SUBCLUSTERS; k++) {
    if (!((whole >>> k) & 1)) continue;
    const last = runs[runs.length - 1];
    if (last && last.end === k * subcluster) last.end += subcluster;
    else runs.push({ start: k * subcluster, end: (k + 1) * subcluster });
  }
  const out: Piece[] = [];
  for (const r of runs) {
    const bytes = new Uint8Array(r.end - r.start);
    for (const p of pieces) {
      const from = Math.max(p.offset, r.start);
      const to = Math.min(p.offset + p.bytes.length, r.end);
      if (from < to) bytes.set(p.bytes.subarray(from - p.offset, to - p.offset), from - r.start);
    }
    out.push({ offset: r.start, bytes });
  }
  // What lies outside the runs is kept as given.
  for (const p of pieces) {
    let at = p.offset;
    const end = p.offset + p.bytes.length;
    for (const r of runs) {
      if (r.end <= at || r.start >= end) continue;
      if (r.start > at) out.push({ offset: at, bytes: p.bytes.subarray(at - p.offset, r.start - p.offset) });
      at = Math.max(at, r.end);
    }
    if (at < end) out.push({ offset: at, bytes: p.bytes.subarray(at - p.offset) });
  }
  return out.sort((a, b) => a.offset - b.offset);
}

/** A chunk of `length` bytes made of zeros and `pieces`, in `into` when it is large enough (a writer's spare slot). */
export function zerosAndPieces(into: Buffer | null, length: number, pieces: readonly Piece[]): Buffer {
  const out = into && into.length >= length ? into.subarray(0, length) : Buffer.allocUnsafe(length);
  let at = 0;
  for (const p of pieces) {
    out.fill(0, at, p.offset);
    out.set(p.bytes, p.offset);
    at = p.offset + p.bytes.length;
  }
  out.fill(0, at);
  return out;
}
