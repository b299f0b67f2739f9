// What a check-out's uploads must satisfy, shared by the laptop's commit (checkouts.ts), an admin's
// hand-back (handback.ts) and a desktop host's handover (hosts/handover.ts): the changes applied to
// the checkpoint, the push receipts, and the audited refusals and views they answer with.
import { decodeManifest, encodedDigest, encodeManifest, referencedChunks, type Manifest } from '../core/chunks/manifest.js';
import { receiptHolds, receiptKey } from '../core/tokens/push-receipt.js';
import type { CheckoutRow, SnapshotDisk } from './db/metadata.js';
import type { BrokerContext } from './context.js';
import { lineageKeysFor } from './desktops/desktops.js';
import { HttpError } from './http.js';
import type { JobView } from './transfers/types.js';

export async function loadManifest(ctx: BrokerContext, digest: string): Promise<Manifest> {
  const raw = await ctx.store.getManifest(digest);
  if (!raw) throw new HttpError(500, 'manifest-missing', `manifest ${digest} is missing from the store`);
  try {
    return decodeManifest(raw);
  } catch (err) {
    // A stored manifest that does not decode is the server's fault, not the request's.
    throw new HttpError(500, 'store-corrupt', `stored manifest ${digest} does not decode: ${(err as Error).message}`);
  }
}

/** Audits a refusal and returns it: `throw await deny(…)`. */
export async function deny(ctx: BrokerContext, user: string, desktopId: string | null, action: string, status: number, code: string, message: string): Promise<HttpError> {
  await ctx.audit({ actor: user, desktopId, action, outcome: 'denied', detail: `${code}: ${message}` });
  return new HttpError(status, code, message, {}, true);
}

/** Every ticket handed out is audited (issue and each renewal). */
export async function auditTicket(ctx: BrokerContext, user: string, desktopId: string, job: JobView): Promise<void> {
  if (!job.transfer) return;
  await ctx.audit({ actor: user, desktopId, action: 'ticket-issue', outcome: 'ok', detail: `job ${job.id} (${job.kind}) on ${job.transfer.url}, valid until ${job.transfer.ticketExpiresAt}` });
}

export function checkoutView(c: CheckoutRow) {
  return { id: c.id, desktopId: c.desktopId, user: c.user, deviceId: c.deviceId, state: c.state, snapshotId: c.checkpointSnapshot, leaseExpiresAt: c.leaseExpiresAt, jobId: c.jobId };
}

/** One disk's changes since the checkpoint: chunk index → its new ID (null: a hole). */
export interface DiskChanges {
  name: string;
  changes: [number, string | null][];
}

/**
 * The checkpoint's disks with an upload's `changes` applied, once every new chunk is the
 * checkpoint's or carries this check-out's push receipt (else 400 `bad-changes`) and is in the
 * store (else 409 `missing-chunks`, listing only receipted chunks: this check-out's own).
 */
export async function checkedChanges(ctx: BrokerContext, user: string, c: Pick<CheckoutRow, 'id' | 'desktopId'>, action: string, baseDisks: SnapshotDisk[], changes: DiskChanges[], receipts: Record<string, string>): Promise<SnapshotDisk[]> {
  const { disks, added } = changes.length ? await changedDisks(ctx, user, c, action, baseDisks, changes) : { disks: baseDisks, added: new Set<string>() };
  const pushed = await pushedByThisCheckout(ctx, user, c, action, baseDisks, added, receipts);
  // Only chunks this check-out pushed can be missing (collected since, after GC's grace): the
  // answer never tells about anyone else's. The checkpoint's are in the store (snapshots keep theirs).
  const missing = await ctx.store.missing(pushed);
  if (missing.length) {
    await ctx.audit({ actor: user, desktopId: c.desktopId, action, outcome: 'denied', detail: `${missing.length} chunks missing` });
    throw new HttpError(409, 'missing-chunks', `the server lacks ${missing.length} chunks the manifests reference`, { missing: missing.slice(0, 10_000) });
  }
  return disks;
}

/**
 * The new chunks of `added` that carry a valid push receipt for this check-out. Any other must be
 * one of the checkpoint's; one that is neither is refused before the store is asked anything, with
 * the same answer whether it exists or not (no oracle, and no way to adopt another desktop's chunk).
 */
async function pushedByThisCheckout(ctx: BrokerContext, user: string, c: Pick<CheckoutRow, 'id' | 'desktopId'>, action: string, baseDisks: SnapshotDisk[], added: Set<string>, receipts: Record<string, string>): Promise<string[]> {
  const desktop = (await ctx.meta.getDesktop(c.desktopId))!;
  const key = receiptKey(ctx.secrets.masterKey);
  const keyContext = (await lineageKeysFor(ctx, desktop)).keyContext;
  const pushed: string[] = [];
  const unreceipted: string[] = [];
  for (const id of added) (receiptHolds(key, { checkoutId: c.id, keyContext, id }, receipts[id]) ? pushed : unreceipted).push(id);
  if (!unreceipted.length) return pushed;
  const checkpoint = new Set<string>();
  for (const d of baseDisks) for (const id of referencedChunks(await loadManifest(ctx, d.digest))) checkpoint.add(id);
  const foreign = unreceipted.filter((id) => !checkpoint.has(id));
  if (foreign.length) {
    throw await deny(ctx, user, c.desktopId, action, 400, 'bad-changes', `${foreign.length} changed chunks (the first ${foreign[0]}) are neither in the checkpoint nor carry a push receipt of this check-out: push them first`);
  }
  return pushed;
}

/**
 * `baseDisks` with `changes` applied: each new manifest stored, its disk entry returned, and the
 * chunks the changes name.
 */
async function changedDisks(ctx: BrokerContext, user: string, c: Pick<CheckoutRow, 'id' | 'desktopId'>, action: string, baseDisks: SnapshotDisk[], changes: DiskChanges[]): Promise<{ disks: SnapshotDisk[]; added: Set<string> }> {
  const bad = async (message: string) => deny(ctx, user, c.desktopId, action, 400, 'bad-changes', message);
  const out: SnapshotDisk[] = [];
  const added = new Set<string>();
  for (const baseDisk of baseDisks) {
    const mine = changes.filter((d) => d.name === baseDisk.name);
    if (mine.length > 1) throw await bad(`disk ${baseDisk.name} is named twice`);
    if (!mine.length || !mine[0]!.changes.length) {
      out.push(baseDisk);
      continue;
    }
    const m = await loadManifest(ctx, baseDisk.digest);
    const chunks = m.chunks.slice();
    const seen = new Set<number>();
    for (const [index, id] of mine[0]!.changes) {
      if (index >= chunks.length) throw await bad(`disk ${baseDisk.name} has ${chunks.length} chunks; there is no chunk ${index}`);
      if (seen.has(index)) throw await bad(`chunk ${index} of disk ${baseDisk.name} is changed twice`);
      seen.add(index);
      chunks[index] = id;
      if (id) added.add(id);
    }
    // The IDs were checked at the route and the base's when it was stored: no second pass over every entry.
    const encoded = encodeManifest({ chunkSize: m.chunkSize, diskSize: m.diskSize, chunks });
    const digest = encodedDigest(encoded);
    await ctx.store.putManifest(digest, encoded);
    out.push({ ...baseDisk, digest });
  }
  const unknown = changes.find((d) => !baseDisks.some((b) => b.name === d.name));
  if (unknown) throw await bad(`desktop has no disk ${unknown.name}`);
  return { disks: out, added };
}
