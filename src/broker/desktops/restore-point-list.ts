import type { DesktopRow, SnapshotRow } from '../db/metadata.js';
import type { BrokerContext } from '../context.js';

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
