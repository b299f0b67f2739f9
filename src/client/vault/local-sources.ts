import { timingSafeEqual } from 'node:crypto';
import type { ChunkId } from '../../core/chunk-id.js';
import { layerSecret } from '../../disk/chain.js';
import type { DesktopKeys } from '../../live/disks/desktop-keys.js';
import { chainOf, type DesktopDisk } from '../../live/disks/disks.js';
import { readFilled, writeFilled, type BaseSink } from '../../live/fill/fill-direct.js';
import { baseFileSource, chunkIndex, copyLocalChunks, LocalChunkReader, type ChunkSource } from '../../live/fill/local-copy.js';
import type { DeviceIdentity } from './home.js';
import { unlock } from './key-release.js';
import { listParked, openParked, parkedDisk, parkedUnusable, readParked, readParkedManifest, type ParkedRecord } from './parked.js';
import type { DesktopState, Vault } from './vault.js';

/**
 * Chunks a check-out finds on this laptop in the copies of *other* desktops of its lineage (clones
 * share the lineage's keys, so equal content has equal chunk IDs), copied instead of fetched.
 * Which copies may be read, and why that releases nothing new (docs/security.md, "Parked copies"):
 *
 * - a checked-out sibling: only as `run` would open it now (`unlock`: this user's password and
 *   device open its wrap, its MACed state holds, its own lease verifies and is unexpired by the
 *   trusted clock, it is not locked), with the same lineage ID key;
 * - a parked sibling: under the same rules as the desktop's own parked copy (this user, this device
 *   identity, this check-out's policy `keepLocalCopy`/`keepLocalCopyDays`), its record opened with
 *   the password and device, its base unwritten since parking (stamp), and its LUKS secret derived
 *   with the lineage keys this check-out's lease released.
 *
 * Every chunk read is used only when the HMAC of its plaintext under the lineage ID key is the chunk
 * ID this check-out's checkpoint names (local-copy.ts): the user receives no byte the checkpoint they
 * are entitled to does not hold. Anything else is fetched. Nothing here writes to a sibling.
 */
export async function findSiblingCopies(o: {
  vault: Vault; device: DeviceIdentity; password: () => Promise<string>; state: DesktopState; keys: DesktopKeys;
  /** Each disk and the chunk indexes it holds durable already (`readFilled`). */
  disks: { disk: Pick<DesktopDisk, 'base'>; filled: Set<number> }[]; log: (l: string) => void;
}): Promise<SiblingCopies | null> {
  const present = o.disks.map((d) => d.filled);
  const wanted = new Set<ChunkId>();
  o.disks.forEach(({ disk }, d) => disk.base.chunks.forEach((id, i) => id && !present[d]!.has(i) && wanted.add(id)));
  if (wanted.size === 0) return null;
  const sources = await siblingSources({ ...o, wanted });
  return sources.length ? { present, sources } : null;
}

/** Sibling copies that hold chunks a check-out still needs (open: `copySiblingChunks` or `closeSiblingCopies` closes them), and what each disk held when they were found. */
export interface SiblingCopies {
  present: Set<number>[];
  sources: ChunkSource[];
}

/** Copies what `found` holds into the disks' bases (the same disks, in the same order, it was found for), then closes its sources. */
export async function copySiblingChunks(o: {
  keys: DesktopKeys; disks: { disk: Pick<DesktopDisk, 'base'>; dir: string; sink: BaseSink }[]; log: (l: string) => void; signal?: AbortSignal;
  /** Each chunk written: its plaintext bytes (the progress every view shows counts it as done). */
  onCopied?: (bytes: number) => void;
}, found: SiblingCopies): Promise<{ copiedChunks: number; rejectedChunks: number }> {
  const { present, sources } = found;
  let copiedChunks = 0;
  let rejectedChunks = 0;
  try {
    for (const [d, { disk, dir, sink }] of o.disks.entries()) {
      const r = await copyLocalChunks({ target: disk.base, present: present[d]!, sources, sink, idKey: o.keys.idKey, log: o.log, signal: o.signal, onWritten: o.onCopied });
      if (r.written.length === 0) continue;
      // Durable (data, then mapping) before it is recorded: the fill then fetches only the rest.
      await sink.persist();
      await writeFilled(dir, [...present[d]!, ...r.written]);
      copiedChunks += r.written.length;
      rejectedChunks += r.rejected;
    }
    if (copiedChunks > 0) o.log(`copied ${copiedChunks} chunks from this laptop's copies of ${sources.map((s) => s.label).join(', ')} (same lineage), instead of fetching them`);
    return { copiedChunks, rejectedChunks };
  } finally {
    await closeSiblingCopies(found);
  }
}

/** Closes the sources `found` still holds open (once: a second call finds none). */
export async function closeSiblingCopies(found: SiblingCopies | null): Promise<void> {
  for (const s of found?.sources.splice(0) ?? []) await s.close().catch(() => undefined);
}

/**
 * The same sibling copies, under the same rules, for a check-out that `run` or `serve` continue:
 * read on demand behind the remote checkpoint (each chunk checked against its ID there), never
 * written. Null when no copy this check-out may read holds a chunk it still needs.
 */
export async function siblingReader(o: {
  vault: Vault; device: DeviceIdentity; password: () => Promise<string>; state: DesktopState; keys: DesktopKeys;
  disks: { disk: Pick<DesktopDisk, 'base'>; dir: string }[]; log: (l: string) => void;
}): Promise<LocalChunkReader | null> {
  const wanted = new Set<ChunkId>();
  for (const { disk, dir } of o.disks) {
    const present = await readFilled(dir);
    disk.base.chunks.forEach((id, i) => id && !present.has(i) && wanted.add(id));
  }
  if (wanted.size === 0) return null;
  const sources = await siblingSources({ ...o, wanted });
  if (sources.length === 0) return null;
  o.log(`chunks this laptop holds in ${[...new Set(sources.map((s) => s.label))].join(', ')} (same lineage) are read here instead of fetched`);
  return new LocalChunkReader(sources, o.keys.idKey, o.log);
}

/** The sibling bases this check-out may read that hold at least one wanted chunk (each one a reason in the log when refused). */
async function siblingSources(o: { vault: Vault; device: DeviceIdentity; password: () => Promise<string>; state: DesktopState; keys: DesktopKeys; wanted: ReadonlySet<ChunkId>; log: (l: string) => void }): Promise<ChunkSource[]> {
  const sources: ChunkSource[] = [];
  const refuse = (what: string, err: unknown) => o.log(`${what} is not read for this check-out (${(err as Error).message})`);
  for (const s of await o.vault.list()) {
    if (s.desktopId === o.state.desktopId || s.user !== o.state.user || s.damaged || s.parking) continue;
    const disks = [];
    for (const d of s.disks) {
      if (!d.complete || d.mergingTo) continue;
      const m = await o.vault.manifest(s.desktopId, d.baseDigest).catch(() => null);
      const at = m ? chunkIndex(m, null, o.wanted) : new Map();
      if (m && at.size > 0) disks.push({ name: d.name, m, at });
    }
    if (disks.length === 0) continue;
    const label = `${s.name} (checked out)`;
    try {
      // The gate `run` passes: wrap, MACed state, its own lease unexpired, not locked.
      const opened = await unlock(o.vault, o.device, await o.password(), s);
      if (!sameKey(opened.keys.idKey, o.keys.idKey)) continue; // another lineage after all
      for (const d of disks) {
        const chain = chainOf(o.vault, opened.state, opened.keys, d.name);
        sources.push(await baseFileSource({ label, path: chain.files.base, passphrase: layerSecret(chain, 'base'), diskSize: d.m.diskSize, chunkSize: d.m.chunkSize, at: d.at }));
      }
    } catch (err) {
      refuse(label, err);
    }
  }
  for (const p of await listParked(o.vault.home)) {
    if (p.desktopId === o.state.desktopId) continue;
    const rec = await readParked(o.vault.home, p.desktopId);
    if (!rec) continue;
    const label = `the parked copy of ${rec.name}`;
    const why = parkedUnusable(rec, o.state);
    if (why) {
      o.log(`${label} is not read for this check-out (${why})`);
      continue;
    }
    // Only a copy whose manifests hold a wanted chunk costs the password's key derivation.
    if (!(await anyWanted(o.vault.home, rec, o.wanted))) continue;
    try {
      const opened = await openParked(o.vault.home, p.desktopId, o.device, await o.password());
      try {
        for (const disk of opened.rec.disks) {
          const d = await parkedDisk(o.vault.home, opened, disk, o.keys);
          const at = chunkIndex(d.manifest, disk.known, o.wanted);
          if (at.size > 0) sources.push(await baseFileSource({ label, path: d.path, passphrase: d.passphrase, diskSize: d.manifest.diskSize, chunkSize: d.manifest.chunkSize, at }));
        }
      } finally {
        opened.oldVaultKey.fill(0);
      }
    } catch (err) {
      // A rotated data key or another lineage: its passphrase does not derive; the copy stays as it is.
      refuse(label, err);
    }
  }
  return sources;
}

async function anyWanted(home: string, rec: ParkedRecord, wanted: ReadonlySet<ChunkId>): Promise<boolean> {
  for (const d of rec.disks) {
    const m = await readParkedManifest(home, rec.desktopId, d.digest).catch(() => null);
    if (m && chunkIndex(m, d.known, wanted).size > 0) return true;
  }
  return false;
}

function sameKey(a: Uint8Array, b: Uint8Array): boolean {
  return a.length === b.length && timingSafeEqual(a, b);
}
