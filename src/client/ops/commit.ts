import { z } from 'zod';
import { CarryonError } from '../../core/errors.js';
import { BrokerUnreachable } from '../../net/failover.js';
import { BrokerError, type BrokerClient } from '../../net/broker-client.js';

const Committed = z.object({ snapshotId: z.string() }).loose();
const RestorePoints = z.object({ restorePoints: z.array(z.object({ id: z.string(), kind: z.string(), parentId: z.string().nullable() }).loose()) }).loose();

/**
 * Commits a check-in or replicate, with the changes the transfer server named. The commit is the one step that is not simply repeatable:
 * when its answer is lost after it was sent (a broker died, a gateway timed out), it may have
 * been applied. It is sent once more, to whichever broker answers: the broker applies a commit
 * at most once (the snapshot and the state change that consumes the pending upload are one
 * transaction, broker/checkouts.ts), so the second either applies it (the first never did) or
 * answers 409. That 409 is then told apart from a check-out ended another way (an admin's
 * force-unlock) by the snapshot a commit makes: kind checkin/replica, child of `checkpoint`,
 * the version the upload was based on.
 */
export async function commitUpload(broker: BrokerClient, state: { checkoutId: string; desktopId: string; name: string }, kind: 'checkin' | 'replicate' | 'handback', checkpoint: string | null, changes: { name: string; changes: [number, string | null][] }[] = [], receipts: ReadonlyMap<string, string> = new Map()): Promise<{ snapshotId: string }> {
  const path = `/v1/checkouts/${state.checkoutId}/${kind}/commit`;
  const body = { disks: withReceipts(changes, receipts) };
  try {
    return await broker.call('POST', path, body, Committed);
  } catch (err) {
    if (!(err instanceof BrokerUnreachable) || !err.maybeApplied) throw err;
  }
  try {
    return await broker.call('POST', path, body, Committed, {}, { repeatable: true });
  } catch (err) {
    if (!(err instanceof BrokerError) || err.code !== 'wrong-state') throw err;
  }
  const made = checkpoint ? await committedSnapshot(broker, state.desktopId, checkpoint, kind) : null;
  if (made) return { snapshotId: made };
  throw new CarryonError('commit-unknown', `the broker's answer to the ${kind} of ${state.name} was lost and the check-out has ended without a snapshot from this upload that can be found; your offline changes are kept on this laptop (\`carryon status\`; save them with \`carryon export ${state.name} <file>\`)`);
}

/** Each change with the push receipt of its new chunk, inline: `[index, id, receipt]` (the broker refuses a new chunk without one). */
function withReceipts(changes: { name: string; changes: [number, string | null][] }[], receipts: ReadonlyMap<string, string>) {
  return changes.map((d) => ({
    name: d.name,
    changes: d.changes.map(([index, id]) => {
      const r = id ? receipts.get(id) : undefined;
      return r ? [index, id, r] : [index, id];
    }),
  }));
}

async function committedSnapshot(broker: BrokerClient, desktopId: string, checkpoint: string, kind: 'checkin' | 'replicate' | 'handback'): Promise<string | null> {
  const { restorePoints } = await broker.call('GET', `/v1/desktops/${encodeURIComponent(desktopId)}/restore-points`, undefined, RestorePoints);
  return restorePoints.find((p) => p.parentId === checkpoint && p.kind === (kind === 'replicate' ? 'replica' : kind))?.id ?? null;
}
