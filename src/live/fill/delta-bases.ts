import { existsSync } from 'node:fs';
import { rm } from 'node:fs/promises';
import { join } from 'node:path';
import { z } from 'zod';
import type { ChunkId } from '../../core/chunk-id.js';
import { ZERO_BASE } from '../../core/chunks/delta-record.js';
import type { Manifest } from '../../core/chunks/manifest.js';
import { unmapChunksExcept } from '../../disk/qcow2/qcow2-unmap.js';
import { writeFileAtomic } from '../../files/atomic.js';
import { readJsonFile } from '../../files/json-file.js';
import { recordMac, recordMacOk, type DesktopKeys } from '../disks/desktop-keys.js';
import { readFilled } from './fill-direct.js';

/**
 * Delta bases: chunks a taken-over parked base keeps mapped at indexes the new checkpoint changed,
 * so the check-out can ask for the pages that make the new chunk from the old one (a delta record,
 * core/chunks/delta-record.ts) and write only those over it (architecture decision 66).
 *
 * `deltas.json` (MACed under the desktop's keys: a laptop owner who edits it only loses the
 * saving) lists index → old chunk. Such an index is not in `filled.json`: a check-out that stops
 * leaves it stale-but-mapped, which only a fill that knows the old chunk may write over. Anything
 * that opens the chain for a guest (`run`, `serve`: they read missing chunks from a remote backing,
 * and a mapped stale cluster would hide it) first drops them: `dropDeltaBases` unmaps every index
 * not filled, then removes the file. Writing pages is idempotent (they overwrite their ranges, and
 * the old and new chunk agree elsewhere), so a fill cut anywhere is simply run again.
 */
const DeltasBody = z.object({ v: z.literal(1), bases: z.array(z.tuple([z.number().int().nonnegative(), z.string().regex(/^[0-9a-f]{64}$/)])) }).strict();
const DeltasFile = z.object({ body: z.string(), mac: z.string() }).strict();
const FILE = 'deltas.json';
const purpose = (disk: string) => `deltas:${disk}`;

/**
 * Indexes the new checkpoint changed and nothing else fills, by the chunk the parked base holds
 * there: its old chunk (kept mapped), or ZERO_BASE where it was a hole (pages over zeros make the
 * whole chunk, written whole: that needs nothing of the base, so any index the parked copy did not
 * hold qualifies too).
 */
export function deltaCandidates(parked: Manifest, next: Manifest, known: readonly number[] | null, keep: ReadonlySet<number>): Map<number, ChunkId> {
  const out = new Map<number, ChunkId>();
  if (parked.chunkSize !== next.chunkSize) return out;
  const held = known ? new Set(known) : null;
  next.chunks.forEach((want, i) => {
    if (!want || keep.has(i)) return;
    const old = held && !held.has(i) ? null : (parked.chunks[i] ?? null);
    if (old === want) return;
    out.set(i, old ?? ZERO_BASE);
  });
  return out;
}

/** Indexes kept mapped for pages (a hole's pages are written whole: nothing to keep). */
export const keptForPages = (bases: ReadonlyMap<number, ChunkId>): number[] => [...bases].filter(([, b]) => b !== ZERO_BASE).map(([i]) => i);

export async function writeDeltaBases(dir: string, keys: DesktopKeys, desktopId: string, disk: string, bases: ReadonlyMap<number, ChunkId>): Promise<void> {
  const body = JSON.stringify({ v: 1, bases: [...bases] });
  await writeFileAtomic(join(dir, FILE), JSON.stringify({ body, mac: recordMac(keys, desktopId, purpose(disk), body) }));
}

/** The delta bases of a disk still to fill (the `filled` indexes left out); empty when none, or the file is not ours. */
export async function readDeltaBases(dir: string, keys: DesktopKeys, desktopId: string, disk: string, filled: ReadonlySet<number>): Promise<Map<number, ChunkId>> {
  const file = await readJsonFile(join(dir, FILE), DeltasFile, { missing: null, damaged: null });
  if (!file || !recordMacOk(keys, desktopId, purpose(disk), file.body, file.mac)) return new Map();
  let parsed;
  try {
    parsed = DeltasBody.safeParse(JSON.parse(file.body));
  } catch {
    return new Map();
  }
  if (!parsed.success) return new Map();
  return new Map(parsed.data.bases.filter(([i]) => !filled.has(i)));
}

export const hasDeltaBases = (dir: string): boolean => existsSync(join(dir, FILE));

/**
 * Before a guest opens the chain: every index of an incomplete base that is not filled is unmapped
 * (stale chunks kept for deltas included), then `deltas.json` goes. Nothing to do without the file.
 */
export async function dropDeltaBases(dir: string, basePath: string, chunkSize: number, complete: boolean): Promise<number> {
  const path = join(dir, FILE);
  // Damaged or not ours, it still says stale chunks may be mapped: they go all the same.
  if (!hasDeltaBases(dir)) return 0;
  const unmapped = complete ? 0 : await unmapChunksExcept(basePath, chunkSize, await readFilled(dir));
  await rm(path, { force: true });
  return unmapped;
}

/** A complete base needs no delta bases. */
export async function clearDeltaBases(dir: string): Promise<void> {
  await rm(join(dir, FILE), { force: true });
}
