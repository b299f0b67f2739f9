import { z } from 'zod';
import { openBlob } from '../../core/chunks/blob.js';
import { isChunkId, type ChunkId } from '../../core/chunk-id.js';
import { unwrapLineageKeys } from '../../core/keys.js';
import { decodeManifest, referencedChunks } from '../../core/chunks/manifest.js';
import type { CheckoutRow, DesktopRow, SnapshotDisk } from '../db/metadata.js';
import type { BrokerContext } from '../context.js';
import { HttpError } from '../http.js';
import { restorePoints, type RestorePoint } from './restore-point-list.js';

const FAILURES = 'checkout.failures';
const Failures = z.record(z.string(), z.string());

/** Why each check-out that stopped for good stopped (`admin checkouts`, the console), by check-out ID. */
export async function checkoutFailures(ctx: BrokerContext): Promise<Record<string, string>> {
  const raw = await ctx.meta.getSetting(FAILURES);
  const parsed = Failures.safeParse(raw ? JSON.parse(raw) : {});
  return parsed.success ? parsed.data : {};
}

async function recordCheckoutFailure(ctx: BrokerContext, checkoutId: string, reason: string): Promise<void> {
  // The newest 200: a failure matters while its check-out is held, and each one is in the audit trail anyway.
  const all = Object.entries({ ...(await checkoutFailures(ctx)), [checkoutId]: reason }).slice(-200);
  await ctx.meta.setSetting(FAILURES, JSON.stringify(Object.fromEntries(all)));
}

/**
 * Chunks known to be damaged in the store: found by `admin verify`, or named by a laptop whose
 * check-out could not authenticate them and confirmed here against the store's own copy. A
 * snapshot is damaged when its manifests reference one; such a snapshot is not handed out.
 * Kept as one setting (a few entries at most; the store is not expected to rot wholesale).
 */
const SETTING = 'store.damaged-chunks';
const DamagedChunks = z.record(z.string(), z.object({ at: z.string(), detail: z.string() }));
type DamagedChunks = z.infer<typeof DamagedChunks>;

async function readDamaged(ctx: BrokerContext): Promise<DamagedChunks> {
  const raw = await ctx.meta.getSetting(SETTING);
  const parsed = DamagedChunks.safeParse(raw ? JSON.parse(raw) : {});
  return parsed.success ? parsed.data : {};
}

/**
 * Records damaged chunks. `replaceAll` (a verify that read every referenced chunk): the list
 * becomes exactly these, so a chunk repaired since is handed out again.
 */
export async function recordDamagedChunks(ctx: BrokerContext, chunks: { id: string; detail: string }[], opts: { replaceAll: boolean }): Promise<void> {
  const now = new Date().toISOString();
  const known = opts.replaceAll ? {} : await readDamaged(ctx);
  for (const c of chunks) known[c.id] = known[c.id] ?? { at: now, detail: c.detail };
  await ctx.meta.setSetting(SETTING, JSON.stringify(known));
}

/** The first damaged chunk these disks reference, or null (a missing manifest counts as damage too). */
async function damageIn(ctx: BrokerContext, disks: readonly SnapshotDisk[], damaged: DamagedChunks): Promise<{ chunk: string; detail: string } | null> {
  if (Object.keys(damaged).length === 0) return null;
  for (const d of disks) {
    const raw = await ctx.store.getManifest(d.digest);
    if (!raw) return { chunk: `manifest ${d.digest}`, detail: 'missing from the store' };
    for (const id of referencedChunks(decodeManifest(raw))) if (damaged[id]) return { chunk: id, detail: damaged[id].detail };
  }
  return null;
}

/** The newest restore point of the desktop other than its current version whose chunks are all intact. */
async function newestIntact(ctx: BrokerContext, desktop: DesktopRow, damaged: DamagedChunks): Promise<RestorePoint | null> {
  for (const rp of await restorePoints(ctx, desktop)) {
    if (rp.current) continue;
    const s = await ctx.meta.getSnapshot(rp.id);
    if (s && !(await damageIn(ctx, s.disks, damaged))) return rp;
  }
  return null;
}

/** The version people know a snapshot by: a check-out's checkpoint repeats its parent. */
async function versionOf(ctx: BrokerContext, snapshotId: string): Promise<string> {
  let s = await ctx.meta.getSnapshot(snapshotId);
  while (s && s.kind === 'checkpoint' && s.parentId) {
    const parent = await ctx.meta.getSnapshot(s.parentId);
    if (!parent) break;
    s = parent;
  }
  return s?.id ?? snapshotId;
}

/** The refusal for a snapshot that references damaged chunks, naming what to use instead; null when it is intact. */
export async function damagedSnapshotRefusal(ctx: BrokerContext, desktop: DesktopRow, snapshotId: string, disks: readonly SnapshotDisk[]): Promise<HttpError | null> {
  const damaged = await readDamaged(ctx);
  const found = await damageIn(ctx, disks, damaged);
  if (!found) return null;
  const rp = await newestIntact(ctx, desktop, damaged);
  const why = found.detail.replace(/^chunk [0-9a-f]{64}: /, '');
  const what = `${desktop.name}'s snapshot ${await versionOf(ctx, snapshotId)} is damaged in the datacenter's store (chunk ${found.chunk.slice(0, 12)}…: ${why}), so it is not handed out`;
  const instead = rp
    ? `the newest intact restore point is ${rp.id} (${rp.kind}, ${rp.createdAt}): an administrator can make it current with \`carryon admin desktops restore ${desktop.name} ${rp.id}\``
    : 'no intact restore point is left: an administrator must restore the desktop from a backup';
  return new HttpError(409, 'snapshot-damaged', `${what}; ${instead}`, { restorePoint: rp });
}

/**
 * A laptop says a chunk of its check-out failed authentication repeatedly. Its word alone marks
 * nothing (a laptop could otherwise make its own desktop unavailable): the store's copy is read
 * and authenticated here. Audited either way; answers whether the snapshot is damaged, and the
 * refusal the next check-out would get.
 */
export async function reportChunkFailure(ctx: BrokerContext, c: CheckoutRow, chunkId: string, laptopDetail: string) {
  const user = c.user;
  if (!isChunkId(chunkId)) throw new HttpError(400, 'invalid', 'not a chunk ID');
  const snapshot = (await ctx.meta.getSnapshot(c.checkpointSnapshot))!;
  const desktop = (await ctx.meta.getDesktop(c.desktopId))!;
  let inSnapshot = false;
  for (const d of snapshot.disks) {
    const raw = await ctx.store.getManifest(d.digest);
    if (raw && referencedChunks(decodeManifest(raw)).has(chunkId as ChunkId)) inSnapshot = true;
  }
  if (!inSnapshot) throw new HttpError(400, 'not-in-snapshot', `chunk ${chunkId} is not part of this check-out's snapshot`);
  const storeProblem = await authenticateStored(ctx, desktop, chunkId as ChunkId);
  const base = `check-out ${c.id} of ${desktop.name}: chunk ${chunkId.slice(0, 16)}… failed authentication on the laptop (${laptopDetail.slice(0, 300)})`;
  if (storeProblem) {
    await recordDamagedChunks(ctx, [{ id: chunkId, detail: storeProblem }], { replaceAll: false });
    // The check-out cannot complete: its transfer slot is freed, and admin views say why it stopped.
    await ctx.scheduler.finishForCheckout(c.id, 'failed');
    await recordCheckoutFailure(ctx, c.id, 'damaged snapshot');
    await ctx.audit({ actor: user, desktopId: c.desktopId, action: 'checkout-damaged', outcome: 'failed', detail: `${base}; the store's copy fails too (${storeProblem}): snapshot ${await versionOf(ctx, snapshot.id)} is damaged and no longer handed out` });
  } else {
    await ctx.audit({ actor: user, desktopId: c.desktopId, action: 'checkout-chunk-failure', outcome: 'failed', detail: `${base}; the store's copy authenticates: the fault is between the store and the laptop` });
  }
  const refusal = await damagedSnapshotRefusal(ctx, desktop, snapshot.id, snapshot.disks);
  return { damaged: Boolean(storeProblem), message: refusal?.message ?? null };
}

/** Why the store's copy of a chunk does not authenticate, or null when it does. */
async function authenticateStored(ctx: BrokerContext, desktop: DesktopRow, id: ChunkId): Promise<string | null> {
  const wrapped = await ctx.meta.getLineageKeys(desktop.lineageId);
  if (!wrapped) return `lineage ${desktop.lineageId} has no keys`;
  try {
    const blob = await ctx.store.get(id);
    if (!blob) return 'missing from the store';
    openBlob(unwrapLineageKeys(ctx.secrets.masterKey, wrapped, `lineage:${desktop.lineageId}`), id, blob);
    return null;
  } catch (err) {
    return (err as Error).message;
  }
}
