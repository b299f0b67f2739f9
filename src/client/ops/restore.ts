import { z } from 'zod';
import { findEntry, onlineSession, type ClientEnv } from '../session/session.js';

const RestorePoint = z.object({ id: z.string(), kind: z.string(), createdAt: z.string(), sizeBytes: z.number(), current: z.boolean() }).loose();
const RestorePoints = z.object({ restorePoints: z.array(RestorePoint), canRestore: z.boolean(), reason: z.string().optional() });

/** A desktop's restore points, newest first, and whether this user may restore it now (policy `restoreAllowed`, not checked out). */
export async function listRestorePoints(env: ClientEnv, desktopRef: string) {
  const { broker } = await onlineSession(env);
  try {
    const entry = await findEntry(broker, desktopRef);
    return { desktop: entry.name, ...(await broker.call('GET', `/v1/desktops/${entry.id}/restore-points`, undefined, RestorePoints)) };
  } finally {
    await broker.close();
  }
}

/** Makes a restore point the desktop's current version (the next check-out starts from it); the broker decides and audits. */
export async function restoreDesktop(env: ClientEnv, desktopRef: string, restorePoint: string, reason?: string) {
  const { broker } = await onlineSession(env);
  try {
    const entry = await findEntry(broker, desktopRef);
    const r = await broker.call('POST', `/v1/desktops/${entry.id}/restore`, { snapshotId: restorePoint, reason }, z.object({ snapshotId: z.string(), restoredFrom: z.string() }));
    env.log(`${entry.name}: restore point ${r.restoredFrom} is now the current version; the next check-out starts from it`);
    return { desktop: entry.name, ...r };
  } finally {
    await broker.close();
  }
}
