import { deltaRecordId } from '../../core/chunks/delta-record.js';
import type { ChunkId } from '../../core/chunk-id.js';
import { decodeManifest, referencedChunks } from '../../core/chunks/manifest.js';
import { isCollectable, type ChunkStore, type CollectableStore } from '../../store/chunk-store.js';
import { oldestHold } from '../../store/in-flight.js';
import type { SnapshotDisk, SnapshotRow, MetadataStore } from '../db/metadata.js';
import { HttpError } from '../http.js';
import { applyRetention, DEFAULT_RETENTION, desktopRetention, type RetentionPolicy } from './retention.js';

export interface GcOptions extends RetentionPolicy {
  /** Report what would happen; change nothing. */
  dryRun: boolean;
  /** Blobs last used less than this long before the run started are never swept. */
  graceMs: number;
  /** A pack is rewritten once this share of its bytes is dead (0–1). */
  compactThreshold: number;
  /**
   * Unreferenced manifests younger than this stay: a check-in stores its manifests a moment
   * before the database names them (at least an hour whatever `graceMs`; tests lower it).
   */
  manifestGraceMs: number;
}

export const DEFAULT_GC: GcOptions = { ...DEFAULT_RETENTION, dryRun: false, graceMs: 24 * 3600_000, compactThreshold: 0.3, manifestGraceMs: 3600_000 };

export interface GcReport {
  dryRun: boolean;
  startedAt: string;
  seconds: number;
  cutoff: string;
  snapshots: { kept: number; deleted: { id: string; desktopId: string; kind: string; createdAt: string }[] };
  blobs: { total: number; referenced: number; swept: number; sweptBytes: number; spared: number };
  packs: { total: number; compacted: number; dropped: number; movedBytes: number; freedBytes: number };
  /** Manifests no kept snapshot or check-in in flight names (deleted past their grace). */
  manifests: { total: number; deleted: number };
  /** Store bytes given back: freed pack bytes less the live bytes rewritten by compaction. */
  reclaimedBytes: number;
}

const running = new WeakSet<ChunkStore>();

/**
 * Garbage collection, mark and sweep with a grace period (after Proxmox Backup Server):
 *
 * 1. Retention: per desktop, snapshots outside the policy are deleted (the current snapshot and
 *    the checkpoints of active check-outs are pinned, and the database refuses to delete those
 *    whatever this run computed).
 * 2. Mark: in one read transaction, every kept snapshot's manifests plus the manifests of check-ins
 *    in flight (recorded before any of their blobs is sent) name the live chunks.
 * 3. Sweep: a blob neither marked nor used since the cutoff (run start − grace, and never after the
 *    start of an import still running here) is deleted from the index, and only if its last-use
 *    mark is still older than the cutoff at that instant: a check-in that deduplicates against it
 *    meanwhile (`missing` / `put` mark it used) keeps it.
 * 4. Compaction: packs past `compactThreshold` dead are rewritten; packs with nothing alive go.
 *    Packs another process may still write are left alone (see PackInfo.active).
 */
/** `now` is the run's clock (tests move it instead of sleeping past S3's whole-second Last-Modified). */
export async function collectGarbage(meta: MetadataStore, store: ChunkStore, given: Partial<GcOptions> = {}, now: () => number = Date.now): Promise<GcReport> {
  const opts = { ...DEFAULT_GC, ...given };
  if (!isCollectable(store)) throw new HttpError(409, 'not-supported', 'garbage collection needs a pack store or an S3 store (this one is a file per blob)');
  if (running.has(store)) throw new HttpError(409, 'busy', 'a garbage collection is already running');
  running.add(store);
  try {
    return await run(meta, store, opts, now);
  } finally {
    running.delete(store);
  }
}

async function run(meta: MetadataStore, store: CollectableStore, opts: GcOptions, now: () => number): Promise<GcReport> {
  const t0 = now();
  const hold = oldestHold(store);
  // A mark may be up to the store's touch slack stale, so the grace is never shorter than that.
  const cutoff = Math.min(t0 - Math.max(opts.graceMs, store.touchSlackMs), hold ?? Infinity);

  // 1. Retention.
  const plan = await meta.transaction(async (tx) => {
    const active = await tx.listCheckouts({ activeOnly: true });
    const out: ReturnType<typeof applyRetention>[] = [];
    for (const d of await tx.listDesktops()) {
      const pinned = new Set<string>([...(d.currentSnapshot ? [d.currentSnapshot] : []), ...active.filter((c) => c.desktopId === d.id).map((c) => c.checkpointSnapshot)]);
      // A desktop's own retention wins over the run's.
      out.push(applyRetention(await tx.listSnapshots(d.id), pinned, (await desktopRetention(tx, d.id)) ?? opts, t0));
    }
    return out;
  });
  const dropping = plan.flatMap((p) => p.drop);
  const deletedIds = new Set(opts.dryRun ? dropping.map((s) => s.id) : await meta.deleteSnapshots(dropping.map((s) => s.id)));

  // 2. Mark, from one consistent view of snapshots and check-ins in flight.
  const roots = await meta.transaction(async (tx) => {
    const disks: SnapshotDisk[] = [];
    for (const d of await tx.listDesktops()) for (const s of await tx.listSnapshots(d.id)) if (!deletedIds.has(s.id)) disks.push(...s.disks);
    for (const c of await tx.listCheckouts({ activeOnly: true })) disks.push(...(c.pendingDisks ?? []));
    return new Set(disks.map((d) => d.digest));
  });
  const live = new Set<ChunkId>();
  for (const digest of roots) {
    const raw = await store.getManifest(digest);
    // A kept snapshot whose manifest is gone is damage for `verify` to report; GC must not guess.
    if (!raw) throw new HttpError(500, 'manifest-missing', `manifest ${digest} of a kept snapshot is missing: run \`carryon admin verify\`; nothing was swept`);
    for (const id of referencedChunks(decodeManifest(raw))) live.add(id);
  }
  // A chunk's delta record (how a check-in made it from its base) lives exactly as long as the chunk.
  for (const id of [...live]) live.add(deltaRecordId(id));

  // 3. Sweep.
  const blobs = { total: 0, referenced: 0, swept: 0, sweptBytes: 0, spared: 0 };
  const deadPerPack = new Map<string, number>();
  let batch: ChunkId[] = [];
  const flush = async () => {
    if (!opts.dryRun && batch.length) {
      const r = await store.sweep(batch, cutoff);
      blobs.swept += r.blobs;
      blobs.sweptBytes += r.bytes;
    }
    batch = [];
  };
  for await (const b of store.usage()) {
    blobs.total++;
    if (live.has(b.id)) blobs.referenced++;
    else if (b.touched >= cutoff) blobs.spared++;
    else {
      batch.push(b.id);
      deadPerPack.set(b.pack, (deadPerPack.get(b.pack) ?? 0) + b.length);
      if (opts.dryRun) {
        blobs.swept++;
        blobs.sweptBytes += b.length;
      }
      if (batch.length >= 4096) await flush();
    }
  }
  await flush();

  // Manifests nothing names any more (each is ~32 bytes per chunk of its disk).
  const manifests = { total: 0, deleted: 0 };
  const manifestCutoff = Math.min(cutoff, t0 - opts.manifestGraceMs);
  for await (const m of store.manifests()) {
    manifests.total++;
    if (roots.has(m.digest) || m.modifiedAt >= manifestCutoff) continue;
    if (!opts.dryRun) await store.deleteManifest(m.digest);
    manifests.deleted++;
  }

  // 4. Compaction.
  const packs = { total: 0, compacted: 0, dropped: 0, movedBytes: 0, freedBytes: 0 };
  // Harmless in a dry run too: this process just starts new packs for its next writes.
  await store.sealPacks();
  for (const p of await store.packs()) {
    packs.total++;
    if (p.active || p.bytes === 0) continue;
    const liveBytes = opts.dryRun ? Math.max(0, p.liveBytes - (deadPerPack.get(p.name) ?? 0)) : p.liveBytes;
    if (liveBytes === 0) {
      const freed = opts.dryRun ? p.bytes : await store.dropPack(p);
      if (freed > 0) {
        packs.dropped++;
        packs.freedBytes += freed;
      }
    } else if ((p.bytes - liveBytes) / p.bytes >= opts.compactThreshold) {
      const r = opts.dryRun ? { moved: 1, freedBytes: p.bytes } : await store.compactPack(p);
      if (r.freedBytes > 0) {
        packs.compacted++;
        packs.freedBytes += r.freedBytes;
        packs.movedBytes += liveBytes;
      }
    }
  }
  const deleted = dropping.filter((s) => deletedIds.has(s.id)).map((s: SnapshotRow) => ({ id: s.id, desktopId: s.desktopId, kind: s.kind, createdAt: s.createdAt }));
  return {
    dryRun: opts.dryRun,
    startedAt: new Date(t0).toISOString(),
    seconds: (now() - t0) / 1000,
    cutoff: new Date(cutoff).toISOString(),
    snapshots: { kept: plan.reduce((n, p) => n + p.keep.length, 0) + dropping.length - deleted.length, deleted },
    blobs,
    packs,
    manifests,
    reclaimedBytes: packs.freedBytes - packs.movedBytes,
  };
}
