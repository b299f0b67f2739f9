import { lineageKeysFor } from '../desktops/desktops.js';
import type { BrokerContext } from '../context.js';
import { auditTicket, checkedChanges, deny, type DiskChanges } from '../upload-rules.js';
import { hostJobOwner } from './health.js';
import type { PlacementRow } from './store.js';

/**
 * A host's background replica of a desktop it runs (issue 26 item 6, the laptop's `replicate`):
 * begin opens an upload job owned by `host:<host>:<desktop>` against the snapshot the placement
 * holds (the one it started from, or its last replica); commit applies the pages under the
 * laptop's rules (receipts bound to that owner) and records a restore point (kind `replica`) that
 * becomes both the desktop's current snapshot and the placement's, so a fail-over starts from it.
 * Only the host the desktop runs on, and never while a check-out holds it or a handover is open.
 */

const ACTION = 'host-replica';

/** The placement a replica may act on now, else an audited refusal (409: the host abandons its point, nothing lost). */
async function replicable(ctx: BrokerContext, hostId: string, desktopId: string, action: string): Promise<PlacementRow> {
  const actor = `host:${hostId}`;
  const p = await ctx.hosts.placement(desktopId);
  if (!p || p.hostId !== hostId || p.state !== 'running' || !p.snapshotId) {
    throw await deny(ctx, actor, p ? desktopId : null, action, 409, 'not-running-here', `desktop ${desktopId} is not running on host ${hostId}${p ? ` (it is ${p.state} on ${p.hostId})` : ''}`);
  }
  const held = await ctx.meta.activeCheckout(desktopId);
  if (held) throw await deny(ctx, actor, desktopId, action, 409, 'locked', `the desktop is being checked out by ${held.user} (check-out ${held.id}, ${held.state})`);
  const h = await ctx.hosts.handoverOf(desktopId);
  if (h && !['done', 'failed', 'cancelled'].includes(h.step)) throw await deny(ctx, actor, desktopId, action, 409, 'handover-open', `a handover of the desktop is ${h.step}`);
  return p;
}

/** Step 1: an upload job against the placement's snapshot; an earlier one of this placement not committed ends. */
export async function beginReplica(ctx: BrokerContext, hostId: string, desktopId: string) {
  const p = await replicable(ctx, hostId, desktopId, ACTION);
  const desktop = (await ctx.meta.getDesktop(desktopId))!;
  const base = (await ctx.meta.getSnapshot(p.snapshotId!))!;
  const digests = base.disks.map((d) => d.digest);
  const keyRef = await lineageKeysFor(ctx, desktop);
  // Scheduled, nobody waits for it: queued behind users' jobs, rebuilt in the transfer server's idle class.
  const job = await ctx.scheduler.enqueue({ kind: 'replicate', checkoutId: hostJobOwner(hostId, desktopId), desktopId, manifests: digests, baseManifests: digests, background: true, ...keyRef }, 'internal');
  // Compare-and-set on the placement as read: a handover or stop that came in between wins.
  if (!(await ctx.hosts.transition(desktopId, ['running'], 'running', { jobId: job.id })) || (await ctx.hosts.placement(desktopId))?.snapshotId !== p.snapshotId) {
    await ctx.scheduler.finish(job.id, 'cancelled');
    throw await deny(ctx, `host:${hostId}`, desktopId, ACTION, 409, 'not-running-here', 'the desktop changed state meanwhile');
  }
  if (p.jobId) await ctx.scheduler.finish(p.jobId, 'cancelled');
  await auditTicket(ctx, `host:${hostId}`, desktopId, job);
  return { job, snapshotId: base.id, disks: base.disks.map((d) => ({ name: d.name, digest: d.digest })), keys: ctx.keysFor(Buffer.from(keyRef.wrappedKeys, 'base64'), keyRef.keyContext) };
}

/**
 * Step 2: the changes against the placement's snapshot, checked as a laptop's; the restore point
 * becomes current. Idempotent by job, as a laptop's commit is: a host whose answer was lost sends
 * the same commit again at its next contact and is told the snapshot its job made (whatever the
 * placement became since: a handover may have begun from it), with the digests it must fold to.
 */
export async function commitReplica(ctx: BrokerContext, hostId: string, desktopId: string, jobId: string, changes: DiskChanges[], receipts: Record<string, string>) {
  const action = `${ACTION}-commit`;
  const actor = `host:${hostId}`;
  const owner = hostJobOwner(hostId, desktopId);
  const done = await ctx.hosts.replicaCommitted(jobId);
  if (done && done.hostId === hostId && done.desktopId === desktopId) {
    await ctx.audit({ actor, desktopId, action, outcome: 'ok', detail: `job ${jobId} committed already as ${done.snapshotId}: told again (the host did not hear the answer)` });
    return await committedAnswer(ctx, done.snapshotId);
  }
  const p = await replicable(ctx, hostId, desktopId, action);
  if (p.jobId !== jobId || (await ctx.scheduler.checkoutOf(jobId)) !== owner) throw await deny(ctx, actor, desktopId, action, 409, 'no-replica', `job ${jobId} is not this desktop's open replica on host ${hostId}`);
  const base = (await ctx.meta.getSnapshot(p.snapshotId!))!;
  // The receipts were issued to the host's own upload job: they bind to its owner.
  const disks = await checkedChanges(ctx, actor, { id: owner, desktopId }, action, base.disks, changes, receipts);
  const snapshotId = await ctx.meta.createSnapshot({ desktopId, parentId: base.id, kind: 'replica', disks });
  // The placement still running here with this job (a check-out's handover, a stop, another replica win): only then is it current.
  if (!(await ctx.hosts.endReplica(desktopId, hostId, jobId, snapshotId))) {
    await ctx.scheduler.finish(jobId, 'cancelled');
    throw await deny(ctx, actor, desktopId, action, 409, 'not-running-here', 'the desktop changed state meanwhile: keep the writes');
  }
  await ctx.meta.setDesktopSnapshot(desktopId, snapshotId);
  await ctx.scheduler.finish(jobId, 'done');
  const changed = changes.reduce((n, d) => n + d.changes.length, 0);
  await ctx.audit({ actor, desktopId, action: 'snapshot', outcome: 'ok', detail: `replica ${snapshotId}: ${changed} chunks the guest changed on host ${hostId} since ${base.id}` });
  return await committedAnswer(ctx, snapshotId);
}

/** The snapshot a replica made and its disks' digests: the host folds only if they are what it computed. */
async function committedAnswer(ctx: BrokerContext, snapshotId: string) {
  const s = (await ctx.meta.getSnapshot(snapshotId))!;
  return { snapshotId, disks: s.disks.map((d) => ({ name: d.name, digest: d.digest })) };
}

/** The host gave its point up (a failure on its side): the job ends, the placement keeps its snapshot. */
export async function abandonReplica(ctx: BrokerContext, hostId: string, desktopId: string, jobId: string, message: string) {
  await ctx.hosts.endReplica(desktopId, hostId, jobId, null);
  // Ended whatever the placement became meanwhile (a handover, a stop): only a job of this host's for this desktop.
  if ((await ctx.scheduler.checkoutOf(jobId)) === hostJobOwner(hostId, desktopId)) await ctx.scheduler.finish(jobId, 'failed');
  await ctx.audit({ actor: `host:${hostId}`, desktopId, action: ACTION, outcome: 'failed', detail: `job ${jobId}: ${message}` });
  return { ok: true };
}
