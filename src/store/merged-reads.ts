import type { ChunkId } from '../core/chunk-id.js';
import { checkRecord, RECORD_HEAD, type Location } from './pack-index.js';

/** One read of a pack covering several records (`members`: their positions in the request). */
export interface MergedRange {
  pack: string;
  start: number;
  end: number;
  members: number[];
}

/**
 * Records close to each other in one pack go into one range: at most `gap` bytes between
 * neighbours and `max` bytes a range, as the backend finds worth it (a check-out asks for chunks
 * in disk order, which is how an import wrote them).
 */
export function planMergedReads(locs: readonly Location[], { gap, max }: { gap: number; max: number }): MergedRange[] {
  const order = [...locs.keys()].sort((a, b) => {
    const x = locs[a]!;
    const y = locs[b]!;
    return x.pack < y.pack ? -1 : x.pack > y.pack ? 1 : x.offset - y.offset;
  });
  const ranges: MergedRange[] = [];
  for (const k of order) {
    const loc = locs[k]!;
    const end = loc.offset + RECORD_HEAD + loc.length;
    const last = ranges[ranges.length - 1];
    if (last && last.pack === loc.pack && loc.offset - last.end <= gap && end - last.start <= max) {
      last.end = Math.max(last.end, end);
      last.members.push(k);
    } else ranges.push({ pack: loc.pack, start: loc.offset, end, members: [k] });
  }
  return ranges;
}

/** Published records in request order, read in merged ranges (8 at a time); null where the pack is gone. */
export async function readMerged(
  items: readonly { id: ChunkId; loc: Location }[],
  merge: { gap: number; max: number },
  readPack: (loc: { pack: string; offset: number }, length: number) => Promise<Buffer | null>,
): Promise<(Buffer | null)[]> {
  const ranges = planMergedReads(items.map((i) => i.loc), merge);
  const out = new Array<Buffer | null>(items.length).fill(null);
  let next = 0;
  await Promise.all(Array.from({ length: Math.min(8, ranges.length) }, async () => {
    while (next < ranges.length) {
      const r = ranges[next++]!;
      const buf = await readPack({ pack: r.pack, offset: r.start }, r.end - r.start);
      if (!buf) continue;
      for (const k of r.members) {
        const { id, loc } = items[k]!;
        out[k] = checkRecord(buf.subarray(loc.offset - r.start, loc.offset - r.start + RECORD_HEAD + loc.length), id, loc);
      }
    }
  }));
  return out;
}
