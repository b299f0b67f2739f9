import type { DesktopRow, SnapshotRow } from '../db/metadata.js';
import type { BrokerContext } from '../context.js';
import { HttpError } from '../http.js';
import { describePolicySource, effectivePolicy } from '../policies.js';

export interface RestorePoint {
  id: string;
  /** import | clone | checkin | replica | restore */
  kind: string;
  createdAt: string;
  parentId: string | null;
  sizeBytes: number;
  /** The desktop's current version is this one (a check-out's checkpoint counts as its parent). */
  current: boolean;
}

/** Snapshots a desktop can go back to, newest first. Checkpoints repeat their parent and are left out. */
export async function restorePoints(ctx: BrokerContext, desktop: DesktopRow): Promise<RestorePoint[]> {
  const snaps = await ctx.meta.listSnapshots(desktop.id);
  const byId = new Map(snaps.map((s) => [s.id, s]));
  let current: SnapshotRow | undefined = desktop.currentSnapshot ? byId.get(desktop.currentSnapshot) : undefined;
  while (current && current.kind === 'checkpoint' && current.parentId) current = byId.get(current.parentId);
  return snaps
    .filter((s) => s.kind !== 'checkpoint')
    .map((s) => ({ id: s.id, kind: s.kind, createdAt: s.createdAt, parentId: s.parentId, sizeBytes: s.disks.reduce((n, d) => n + d.sizeBytes, 0), current: s.id === current?.id }))
    .reverse();
}

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
