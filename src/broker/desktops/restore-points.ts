import type { DesktopRow } from '../db/metadata.js';
import type { BrokerContext } from '../context.js';
import { damagedSnapshotRefusal } from './damage.js';
import { HttpError } from '../http.js';
import { restorePoints } from './restore-point-list.js';
import { describePolicySource, effectivePolicy } from '../policies.js';

/** Whether `user` (role `role`) may restore `desktop` now, and if not, why. */
export async function restoreRefusal(ctx: BrokerContext, user: string, role: string, desktop: DesktopRow): Promise<{ status: number; code: string; message: string } | null> {
  if (role !== 'admin') {
    if (!await ctx.meta.isEntitled(user, desktop)) return { status: 404, code: 'not-found', message: `no desktop ${desktop.name} you are entitled to` };
    const p = (await effectivePolicy(ctx.meta, user, desktop)).restoreAllowed;
    if (!p.value) return { status: 403, code: 'policy-denied', message: `policy (${await describePolicySource(ctx.meta, p.source)}) does not let users restore ${desktop.name}` };
  }
  const active = await ctx.meta.activeCheckout(desktop.id);
  if (active) {
    return { status: 409, code: 'locked', message: `${desktop.name} is checked out by ${active.user}; check it in or roll back first (an admin can force-unlock)` };
  }
  return null;
}

/**
 * Makes a restore point the desktop's current version: a new snapshot (kind `restore`) with the
 * chosen one's disks, so history is kept and the next check-out starts from it.
 */
export async function restore(ctx: BrokerContext, user: string, role: string, desktop: DesktopRow, snapshotId: string, reason?: string) {
  const refusal = await restoreRefusal(ctx, user, role, desktop);
  if (refusal) {
    await ctx.audit({ actor: user, desktopId: desktop.id, action: 'restore', outcome: 'denied', detail: `${refusal.code}: ${refusal.message}` });
    throw new HttpError(refusal.status, refusal.code, refusal.message, {}, true);
  }
  const point = (await restorePoints(ctx, desktop)).find((p) => p.id === snapshotId);
  if (!point) throw new HttpError(404, 'not-found', `${desktop.name} has no restore point ${snapshotId}`);
  const chosen = (await ctx.meta.getSnapshot(point.id))!;
  const damaged = await damagedSnapshotRefusal(ctx, desktop, chosen.id, chosen.disks);
  if (damaged) {
    await ctx.audit({ actor: user, desktopId: desktop.id, action: 'restore', outcome: 'denied', detail: `${damaged.code}: ${damaged.message}` });
    throw new HttpError(damaged.status, damaged.code, damaged.message, damaged.extra, true);
  }
  const id = await ctx.meta.transaction(async (tx) => {
    if (await tx.activeCheckout(desktop.id)) throw new HttpError(409, 'locked', `${desktop.name} was just checked out`);
    const s = await tx.createSnapshot({ desktopId: desktop.id, parentId: chosen.id, kind: 'restore', disks: chosen.disks });
    await tx.setDesktopSnapshot(desktop.id, s);
    return s;
  });
  await ctx.audit({ actor: user, desktopId: desktop.id, action: 'restore', outcome: 'ok', detail: `${point.kind} ${point.id} of ${point.createdAt} is now current (${id})${reason ? `: ${reason}` : ''}` });
  return { snapshotId: id, restoredFrom: point.id };
}
