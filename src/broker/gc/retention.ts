import type { SnapshotRow } from '../db/metadata.js';

/** Which snapshots of a desktop stay: the last N, every replica younger than D days, and the pinned. */
export interface RetentionPolicy {
  keepLast: number;
  keepReplicaDays: number;
}

export const DEFAULT_RETENTION: RetentionPolicy = { keepLast: 10, keepReplicaDays: 30 };

/** A desktop's own retention (setting `gc.retention.<desktop id>`), else null: the run's applies. */
export async function desktopRetention(meta: { getSetting(key: string): Promise<string | null> }, desktopId: string): Promise<RetentionPolicy | null> {
  const raw = await meta.getSetting(`gc.retention.${desktopId}`);
  if (!raw) return null;
  const v = JSON.parse(raw) as Partial<RetentionPolicy>;
  return typeof v.keepLast === 'number' && typeof v.keepReplicaDays === 'number' ? { keepLast: v.keepLast, keepReplicaDays: v.keepReplicaDays } : null;
}

export async function setDesktopRetention(meta: { setSetting(key: string, value: string): Promise<void> }, desktopId: string, r: RetentionPolicy | null): Promise<void> {
  await meta.setSetting(`gc.retention.${desktopId}`, r ? JSON.stringify(r) : '');
}

/**
 * Splits one desktop's snapshots (oldest first) into kept and dropped. `pinned` are never
 * dropped: the desktop's current snapshot and the checkpoints of its active check-outs.
 */
export function applyRetention(snapshots: readonly SnapshotRow[], pinned: ReadonlySet<string>, policy: RetentionPolicy, now: number): { keep: SnapshotRow[]; drop: SnapshotRow[] } {
  const ordered = [...snapshots].sort((a, b) => (a.createdAt < b.createdAt ? -1 : a.createdAt > b.createdAt ? 1 : 0));
  const lastN = new Set(ordered.slice(Math.max(0, ordered.length - policy.keepLast)).map((s) => s.id));
  const replicaCutoff = now - policy.keepReplicaDays * 86_400_000;
  const keep: SnapshotRow[] = [];
  const drop: SnapshotRow[] = [];
  for (const s of ordered) {
    const young = s.kind === 'replica' && Date.parse(s.createdAt) >= replicaCutoff;
    (pinned.has(s.id) || lastN.has(s.id) || young ? keep : drop).push(s);
  }
  return { keep, drop };
}
