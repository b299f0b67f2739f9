import type { CheckoutRow, SnapshotRow } from './db/metadata.js';
import { ownedCheckout } from './checkouts.js';
import { auditTicket, checkedChanges, checkoutView, deny, type DiskChanges } from './upload-rules.js';
import { lineageKeysFor } from './desktops/desktops.js';
import type { BrokerContext } from './context.js';
import { HttpError } from './http.js';
import { effectivePolicy } from './policies.js';
import type { JobView } from './transfers/types.js';
import { cutOffReason } from './auth/trust.js';

/** Check-outs that ended while the laptop still held work: an admin's force-unlock, or a check-in the laptop changed after. */
const HAND_BACK_FROM = ['cancelled', 'checked_in'] as const;

/** The snapshot of `kind` this check-out made (child of its checkpoint), if any. */
async function madeBy(ctx: BrokerContext, c: CheckoutRow, kind: 'checkin' | 'handback'): Promise<SnapshotRow | null> {
  return (await ctx.meta.listSnapshots(c.desktopId)).find((s) => s.parentId === c.checkpointSnapshot && s.kind === kind) ?? null;
}

const diskView = (s: SnapshotRow) => ({ snapshotId: s.id, disks: s.disks.map((d) => ({ name: d.name, digest: d.digest })) });

/**
 * What became of a check-out, for its holder: its state and the snapshots it made (a check-in,
 * a hand-back), with their manifests' digests, so a laptop whose commit answer was lost can see
 * that the snapshot holds exactly its disks and finish as a check-in would.
 */
export async function checkoutOutcome(ctx: BrokerContext, c: CheckoutRow) {
  const committed = c.state === 'checked_in' ? await madeBy(ctx, c, 'checkin') : null;
  const handedBack = await madeBy(ctx, c, 'handback');
  return { checkout: checkoutView(c), committed: committed && diskView(committed), handedBack: handedBack && diskView(handedBack) };
}

/**
 * Hand-back, step 1: the holder of a check-out that ended without its work (force-unlocked, or
 * checked in before later changes) uploads that work like a check-in, against the check-out's
 * checkpoint. The result becomes a restore point, never the current version: an admin (or the
 * user, where `restoreAllowed`) may make it current. Once per check-out; check-in policy applies.
 */
export async function beginHandback(ctx: BrokerContext, c: CheckoutRow): Promise<{ job: JobView }> {
  const user = c.user;
  const refuse = async (status: number, code: string, message: string, extra: Record<string, unknown> = {}) => {
    const err = await deny(ctx, user, c.desktopId, 'handback', status, code, message);
    return new HttpError(err.status, err.code, err.message, extra, true);
  };
  if (!(HAND_BACK_FROM as readonly string[]).includes(c.state)) throw await refuse(409, 'wrong-state', `only a check-out that has ended can be handed back (it is ${c.state})`);
  const cut = await cutOffReason(ctx, c);
  if (cut) throw await refuse(403, 'cut-off', `no more transfers for this checkout: ${cut}`);
  const desktop = (await ctx.meta.getDesktop(c.desktopId))!;
  const policy = await effectivePolicy(ctx.meta, user, desktop);
  if (!policy.checkinAllowed.value) throw await refuse(403, 'policy-denied', `policy (${policy.checkinAllowed.source}) forbids check-in, and so hand-back`);
  const done = await madeBy(ctx, c, 'handback');
  if (done) throw await refuse(409, 'already-handed-back', `this check-out was handed back as restore point ${done.id}`, { snapshotId: done.id });
  const base = await ctx.meta.getSnapshot(c.checkpointSnapshot);
  const manifests = base ? await Promise.all(base.disks.map((d) => ctx.store.getManifest(d.digest))) : [null];
  if (manifests.some((m) => !m)) throw await refuse(409, 'checkpoint-gone', 'the version this work was based on has been collected since; save it with `carryon export` instead');
  if (c.jobId) await ctx.scheduler.finish(c.jobId, 'cancelled');
  const digests = base!.disks.map((d) => d.digest);
  const job = await ctx.scheduler.enqueue({ kind: 'checkin', checkoutId: c.id, desktopId: c.desktopId, manifests: digests, baseManifests: digests, ...(await lineageKeysFor(ctx, desktop)) });
  // The state stays (the desktop is not locked again); the pending disks mark the hand-back under way.
  if (!await ctx.meta.transitionCheckout(c.id, [c.state], c.state, { jobId: job.id, pendingDisks: base!.disks })) throw await refuse(409, 'wrong-state', 'checkout changed meanwhile');
  await ctx.audit({ actor: user, desktopId: c.desktopId, action: 'transfer-start', outcome: 'ok', detail: `handback job ${job.id} of checkout ${c.id}` });
  await auditTicket(ctx, user, c.desktopId, job);
  return { job };
}

/** Step 2: the changes, checked as a check-in's are, become a restore point (kind `handback`); the current version stays. */
export async function commitHandback(ctx: BrokerContext, user: string, checkoutId: string, changes: DiskChanges[] = [], receipts: Record<string, string> = {}) {
  // Read again after the body, as commitUpload does.
  const c = await ownedCheckout(ctx, user, checkoutId, 'handback-commit');
  if (!(HAND_BACK_FROM as readonly string[]).includes(c.state) || !c.pendingDisks) throw await deny(ctx, user, c.desktopId, 'handback-commit', 409, 'wrong-state', 'no hand-back under way for this checkout');
  const base = (await ctx.meta.getSnapshot(c.checkpointSnapshot))!;
  const disks = await checkedChanges(ctx, user, c, 'handback-commit', base.disks, changes, receipts);
  // At most once: the snapshot and consuming the pending disks are one transaction.
  const snapshotId = await ctx.meta.transaction(async (tx) => {
    const id = await tx.createSnapshot({ desktopId: c.desktopId, parentId: c.checkpointSnapshot, kind: 'handback', disks });
    if (!await tx.setCheckoutCheckpoint(c.id, c.checkpointSnapshot, { endUpload: true })) throw new HttpError(409, 'wrong-state', 'this hand-back has been committed meanwhile');
    return id;
  });
  if (c.jobId) await ctx.scheduler.finish(c.jobId, 'done');
  await ctx.audit({ actor: user, desktopId: c.desktopId, action: 'handback', outcome: 'ok', detail: `checkout ${c.id} handed back as restore point ${snapshotId} (not current; an administrator may restore it)` });
  return { snapshotId, checkout: checkoutView((await ctx.meta.getCheckout(c.id))!) };
}
