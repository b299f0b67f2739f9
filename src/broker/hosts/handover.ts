import { encodeManifest } from '../../core/chunks/manifest.js';
import type { CheckoutRow, DesktopRow } from '../db/metadata.js';
import { auditTicket, checkedChanges, checkoutView, deny, loadManifest, type DiskChanges } from '../upload-rules.js';
import { lineageKeysFor } from '../desktops/desktops.js';
import { effectivePolicy } from '../policies.js';
import type { BrokerContext } from '../context.js';
import { HttpError } from '../http.js';
import { alive, hostJobOwner, lostMessage } from './health.js';
import type { HandoverRow, HandoverStep, PlacementRow } from './store.js';

/**
 * A check-out of a desktop that runs on a host, or is stopped there with the guest's writes (issue
 * 26 item 4, the seed's "powers down the VM, takes a snapshot"): the laptop's check-out locks the
 * desktop, then the host shuts the guest down (ACPI, forced after its grace: audited as which),
 * sends back only the pages the guest wrote (a laptop's check-in upload, its own push receipts),
 * and that snapshot becomes the check-out's checkpoint. The laptop follows the steps (a long poll);
 * once the checkpoint is there its check-out goes on as any other.
 *
 * Meanwhile the laptop fetches the snapshot the host ran from (a download job of the check-out,
 * its ticket covering that snapshot's manifests only, handed to the holder with the 202): every
 * chunk the guest did not change is the checkpoint's too, so after the commit only the changed
 * ones travel. That job ends at the commit, the cancel or the failure.
 *
 * Cancel at any step leaves the desktop where it was: before the host shut it down it keeps
 * running; after, it stays stopped on the host with its writes kept (the host's calls are refused
 * once the check-out ended, and it keeps its top layer); once committed, the writes are the
 * desktop's current snapshot.
 */

const ENDED: readonly HandoverStep[] = ['done', 'failed', 'cancelled'];

export function handoverView(h: HandoverRow) {
  return { host: h.hostId, step: h.step, detail: h.detail, since: h.createdAt, updatedAt: h.updatedAt };
}

/** Inside the check-out (after the lock): asks the placement's host for the desktop, or refuses (the lock is given back). */
export async function askHandover(ctx: BrokerContext, user: string, desktop: DesktopRow, checkoutId: string, p: PlacementRow) {
  const refuse = async (status: number, code: string, message: string) => {
    await ctx.meta.transitionCheckout(checkoutId, ['transferring'], 'cancelled');
    return deny(ctx, user, desktop.id, 'checkout', status, code, message);
  };
  if (p.state === 'lost') {
    throw await refuse(409, 'desktop-online', lostMessage(p, desktop.name));
  }
  if (p.state !== 'running' && p.state !== 'stopped') throw await refuse(409, 'desktop-busy', `the desktop is ${p.state} on host ${p.hostId}; try again in a moment`);
  const host = await ctx.hosts.host(p.hostId);
  if (!host || !alive(host)) throw await refuse(503, 'host-unavailable', `the desktop's online changes are on host ${p.hostId}, which is not answering: try again later`);
  if (!p.snapshotId) throw await refuse(409, 'no-snapshot', `the desktop on host ${p.hostId} has no snapshot it started from`);
  if (!(await ctx.hosts.transition(desktop.id, [p.state], 'returning', { detail: `handing over to check-out ${checkoutId}` }))) throw await refuse(409, 'desktop-busy', `${desktop.name} changed state meanwhile; try again`);
  // The snapshot the host ran from: this desktop's own (the holder may read it whole), fetched while the host works.
  const base = await ctx.meta.getSnapshot(p.snapshotId);
  const prefetch = base && base.desktopId === desktop.id
    ? await ctx.scheduler.enqueue({ kind: 'checkout', checkoutId, desktopId: desktop.id, manifests: base.disks.map((d) => d.digest), ...(await lineageKeysFor(ctx, desktop)) })
    : null;
  await ctx.hosts.addHandover({ checkoutId, desktopId: desktop.id, hostId: p.hostId, baseSnapshot: p.snapshotId, was: p.state, prefetchJobId: prefetch?.id ?? null });
  await ctx.hosts.queue({ hostId: p.hostId, desktopId: desktop.id, type: 'handover' });
  await ctx.audit({ actor: user, desktopId: desktop.id, action: 'handover-request', outcome: 'ok', detail: `check-out ${checkoutId}: host ${p.hostId} ${p.state === 'running' ? 'shuts the guest down and ' : ''}sends back what it wrote since snapshot ${p.snapshotId}` });
  return waitAnswer(ctx, checkoutId);
}

/**
 * The 202 answer while the host works (to the check-out's holder only: checkouts.ts): the
 * check-out, where its handover stands, and while it is open what to fetch meanwhile: the
 * snapshot the host ran from (its manifests, the lineage keys, the job whose ticket covers it).
 */
export async function waitAnswer(ctx: BrokerContext, checkoutId: string) {
  const h = (await ctx.hosts.handover(checkoutId))!;
  const c = (await ctx.meta.getCheckout(checkoutId))!;
  return { checkout: checkoutView(c), handover: handoverView(h), ...(await prefetchOf(ctx, c, h)) };
}

async function prefetchOf(ctx: BrokerContext, c: CheckoutRow, h: HandoverRow) {
  if (!h.prefetchJobId || ENDED.includes(h.step) || c.state !== 'transferring' || c.jobId) return {};
  const job = await ctx.scheduler.get(h.prefetchJobId);
  if (!job || ['done', 'cancelled', 'failed'].includes(job.state)) return {};
  const base = (await ctx.meta.getSnapshot(h.baseSnapshot))!;
  const desktop = (await ctx.meta.getDesktop(c.desktopId))!;
  const keyRef = await lineageKeysFor(ctx, desktop);
  const manifests = await Promise.all(base.disks.map((d) => loadManifest(ctx, d.digest)));
  // The policy's transfer bound holds for these chunks too (the laptop has no check-out policy yet).
  const maxTransferRateKBps = (await effectivePolicy(ctx.meta, c.user, desktop)).maxTransferRateKBps.value;
  await auditTicket(ctx, c.user, c.desktopId, job);
  return {
    prefetch: {
      snapshotId: base.id, maxTransferRateKBps, job, keys: ctx.keysFor(Buffer.from(keyRef.wrappedKeys, 'base64'), keyRef.keyContext),
      disks: base.disks.map((d, i) => ({ name: d.name, digest: d.digest, manifest: encodeManifest(manifests[i]!).toString('base64') })),
    },
  };
}

/** How long a laptop's long poll on the step waits at most, and how often it re-reads (another broker may have moved it). */
export const HANDOVER_WAIT_MS = 25_000;
const REREAD_MS = 1000;

/**
 * `GET /v1/checkouts/:id/handover`: the laptop's poll (its own check-out only). With `after` (the
 * step it knows) it is a long poll: answered when the step moves or the check-out ends (woken at
 * once in this process, re-read every second for the others), or after `waitMs`.
 */
export async function handoverOfCheckout(ctx: BrokerContext, c: CheckoutRow, wait?: { after: HandoverStep; ms: number; signal: AbortSignal }) {
  let h = await ctx.hosts.handover(c.id);
  if (!h) throw new HttpError(404, 'not-found', 'this check-out waits for no host');
  const end = Date.now() + (wait?.ms ?? 0);
  while (wait && h.step === wait.after && c.state === 'transferring' && !wait.signal.aborted && Date.now() < end) {
    // Registered before the re-read: a step that moves between the two still wakes it.
    const stop = new AbortController();
    const woken = ctx.hosts.handoverWaiter(c.id, Math.min(REREAD_MS, end - Date.now()), AbortSignal.any([wait.signal, stop.signal]));
    const [nextH, nextC] = await Promise.all([ctx.hosts.handover(c.id), ctx.meta.getCheckout(c.id)]);
    h = nextH!;
    c = nextC!;
    if (h.step !== wait.after || c.state !== 'transferring') stop.abort();
    await woken;
  }
  return { checkout: checkoutView(c), handover: handoverView(h) };
}

/** The handover the host may act on now: its own, open, with the check-out still waiting (else 409, and the host keeps what it has). */
async function openHandover(ctx: BrokerContext, hostId: string, desktopId: string, steps: readonly HandoverStep[]): Promise<{ h: HandoverRow; c: CheckoutRow }> {
  const h = await ctx.hosts.handoverOf(desktopId);
  if (!h || h.hostId !== hostId || !steps.includes(h.step)) {
    await ctx.audit({ actor: `host:${hostId}`, desktopId, action: 'handover', outcome: 'denied', detail: h ? `handover of check-out ${h.checkoutId} is ${h.step} on ${h.hostId}` : 'no handover' });
    throw new HttpError(409, 'no-handover', `no handover of desktop ${desktopId} waits for host ${hostId}`, {}, true);
  }
  const c = await ctx.meta.getCheckout(h.checkoutId);
  if (!c || c.state !== 'transferring' || c.jobId) {
    await ctx.hosts.handoverStep(h.checkoutId, [h.step], 'cancelled', { detail: `the check-out is ${c?.state ?? 'gone'}` });
    await ctx.audit({ actor: `host:${hostId}`, desktopId, action: 'handover', outcome: 'denied', detail: `check-out ${h.checkoutId} is ${c?.state ?? 'gone'}: the desktop stays on the host` });
    throw new HttpError(409, 'cancelled', `the check-out ${h.checkoutId} was ${c?.state ?? 'removed'}: keep the desktop`, {}, true);
  }
  return { h, c };
}

/** The host took the command: an upload job like a check-in's (its receipts bind to this host and desktop), before it touches the guest. */
export async function beginHandover(ctx: BrokerContext, hostId: string, desktopId: string) {
  const { h } = await openHandover(ctx, hostId, desktopId, ['asked']);
  const desktop = (await ctx.meta.getDesktop(desktopId))!;
  const base = (await ctx.meta.getSnapshot(h.baseSnapshot))!;
  const digests = base.disks.map((d) => d.digest);
  const job = await ctx.scheduler.enqueue({ kind: 'checkin', checkoutId: hostJobOwner(hostId, desktopId), desktopId, manifests: digests, baseManifests: digests, ...(await lineageKeysFor(ctx, desktop)) }, 'internal');
  if (!(await ctx.hosts.handoverStep(h.checkoutId, ['asked'], 'shutting-down', { jobId: job.id }))) {
    await ctx.scheduler.finish(job.id, 'cancelled');
    throw new HttpError(409, 'no-handover', 'the handover moved meanwhile');
  }
  const keyRef = await lineageKeysFor(ctx, desktop);
  await auditTicket(ctx, `host:${hostId}`, desktopId, job);
  return { job, disks: base.disks.map((d) => ({ name: d.name, digest: d.digest })), keys: ctx.keysFor(Buffer.from(keyRef.wrappedKeys, 'base64'), keyRef.keyContext) };
}

/** The guest is off (shut down, or powered off after the grace: `forced`): the pages travel next. */
export async function handoverShutDown(ctx: BrokerContext, hostId: string, desktopId: string, r: { forced: boolean; message: string }) {
  const { h } = await openHandover(ctx, hostId, desktopId, ['shutting-down']);
  await ctx.audit({ actor: `host:${hostId}`, desktopId, action: 'guest-shutdown', outcome: r.forced ? 'failed' : 'ok', detail: `${r.forced ? 'forced' : 'ACPI'}: ${r.message} (check-out ${h.checkoutId})` });
  await ctx.meta.setPowerState(desktopId, 'off');
  if (!(await ctx.hosts.handoverStep(h.checkoutId, ['shutting-down'], 'sending', { detail: r.message }))) throw new HttpError(409, 'no-handover', 'the handover moved meanwhile');
  return { ok: true };
}

/**
 * The host's changes: applied to the snapshot it ran from (receipts of its own upload, or the
 * base's chunks), recorded as the check-out's checkpoint, and the laptop's download job opened.
 */
export async function commitHandover(ctx: BrokerContext, hostId: string, desktopId: string, changes: DiskChanges[], receipts: Record<string, string>) {
  const { h, c } = await openHandover(ctx, hostId, desktopId, ['sending']);
  const actor = `host:${hostId}`;
  const base = (await ctx.meta.getSnapshot(h.baseSnapshot))!;
  // The receipts were issued to this host's upload job: they bind to its owner, not to the laptop's check-out.
  const disks = await checkedChanges(ctx, actor, { ...c, id: hostJobOwner(hostId, desktopId) }, 'handover-commit', base.disks, changes, receipts);
  const snapshotId = await ctx.meta.transaction(async (tx) => {
    // Compare-and-set on the check-out: a cancel that came first wins (the host then keeps its writes).
    if (!(await tx.transitionCheckout(c.id, ['transferring'], 'transferring'))) throw new HttpError(409, 'cancelled', 'the check-out ended meanwhile: keep the desktop');
    const id = await tx.createSnapshot({ desktopId, parentId: h.baseSnapshot, kind: 'checkpoint', disks });
    await tx.setCheckoutCheckpoint(c.id, id);
    await tx.setDesktopSnapshot(desktopId, id);
    return id;
  });
  const changed = changes.reduce((n, d) => n + d.changes.length, 0);
  await ctx.audit({ actor, desktopId, action: 'snapshot', outcome: 'ok', detail: `checkpoint ${snapshotId} of check-out ${c.id}: ${changed} chunks the guest changed on host ${hostId}` });
  if (h.jobId) await ctx.scheduler.finish(h.jobId, 'done');
  // The old snapshot's ticket ends here: what the laptop still lacks comes over the checkpoint's own job.
  if (h.prefetchJobId) await ctx.scheduler.finish(h.prefetchJobId, 'done');
  await ctx.hosts.unplace(desktopId, ['returning']);
  const desktop = (await ctx.meta.getDesktop(desktopId))!;
  const job = await ctx.scheduler.enqueue({ kind: 'checkout', checkoutId: c.id, desktopId, manifests: disks.map((d) => d.digest), ...(await lineageKeysFor(ctx, desktop)) });
  if (!(await ctx.meta.transitionCheckout(c.id, ['transferring'], 'transferring', { jobId: job.id }))) await ctx.scheduler.finish(job.id, 'cancelled');
  else await ctx.audit({ actor: c.user, desktopId, action: 'transfer-start', outcome: 'ok', detail: `job ${job.id} ${job.state}` });
  // Done only once the check-out has its job: the laptop that reads `done` and asks again gets the 201.
  await ctx.hosts.handoverStep(c.id, ['sending'], 'done', { detail: `checkpoint ${snapshotId}` });
  return { snapshotId };
}

/**
 * The host's acknowledgement of a handover that did not complete: the desktop stays as the host
 * says (running, or stopped with its writes), and a check-out still waiting ends, saying why.
 */
export async function handoverFailed(ctx: BrokerContext, hostId: string, desktopId: string, message: string | null, guest: 'running' | 'stopped') {
  const h = await ctx.hosts.handoverOf(desktopId);
  if (!h || h.hostId !== hostId) return;
  if (h.jobId) await ctx.scheduler.finish(h.jobId, 'failed');
  if (h.prefetchJobId) await ctx.scheduler.finish(h.prefetchJobId, 'cancelled');
  if (await ctx.hosts.transition(desktopId, ['returning'], guest, { detail: message })) await ctx.meta.setPowerState(desktopId, guest === 'running' ? 'on' : 'off');
  const cancelled = await ctx.hosts.handoverStep(h.checkoutId, ['asked', 'shutting-down', 'sending'], 'failed', { detail: message });
  const c = await ctx.meta.getCheckout(h.checkoutId);
  if (c && c.state === 'transferring' && !c.jobId && (await ctx.meta.transitionCheckout(c.id, ['transferring'], 'cancelled'))) {
    await ctx.audit({ actor: `host:${hostId}`, desktopId, action: 'unlock', outcome: 'failed', detail: `check-out ${c.id}: host ${hostId} could not hand the desktop over (${message ?? 'no reason'}); it stays ${guest} there` });
  } else if (cancelled || ENDED.includes(h.step)) {
    await ctx.audit({ actor: `host:${hostId}`, desktopId, action: 'handover', outcome: 'info', detail: `the desktop stays ${guest} on host ${hostId}: ${message ?? ''}` });
  }
}

/** A host marked lost in the middle of a handover: the waiting check-out ends (what the guest wrote is at risk, as for any lost host). */
export async function handoverLost(ctx: BrokerContext, desktopId: string, hostId: string): Promise<void> {
  const h = await ctx.hosts.handoverOf(desktopId);
  if (!h || h.hostId !== hostId || ENDED.includes(h.step)) return;
  await ctx.hosts.handoverStep(h.checkoutId, [h.step], 'failed', { detail: `host ${hostId} stopped answering` });
  if (h.jobId) await ctx.scheduler.finish(h.jobId, 'failed');
  if (h.prefetchJobId) await ctx.scheduler.finish(h.prefetchJobId, 'cancelled');
  if (await ctx.meta.transitionCheckout(h.checkoutId, ['transferring'], 'cancelled')) {
    await ctx.audit({ actor: 'system', desktopId, action: 'unlock', outcome: 'failed', detail: `check-out ${h.checkoutId}: host ${hostId} stopped answering during the handover` });
  }
}
