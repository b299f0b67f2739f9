import { referencedChunks, encodeManifest } from '../core/chunks/manifest.js';
import { signLease, type SignedLease } from '../core/tokens/lease.js';
import { policyHash, policyValues, type PolicyValues } from '../core/policy.js';
import type { CheckoutRow, DesktopConfig, DesktopRow, SnapshotRow } from './db/metadata.js';
import type { BrokerContext } from './context.js';
import { damagedSnapshotRefusal } from './desktops/damage.js';
import { askHandover, waitAnswer } from './hosts/handover.js';
import { auditTicket, checkedChanges, checkoutView, deny, loadManifest, type DiskChanges } from './upload-rules.js';
import { startAfterCheckin } from './hosts/power.js';
import { HttpError } from './http.js';
import { lineageKeysFor } from './desktops/desktops.js';
import { describePolicySource, effectivePolicy } from './policies.js';
import type { JobView } from './transfers/types.js';
import { stillAllowed } from './auth/trust.js';
import { unlockShare } from './online-unlock.js';

export interface HostFacts {
  cpus: number;
  ramBytes: number;
  freeDiskBytes: number;
}

export type Action = 'checkout' | 'cancel' | 'checkin' | 'replicate' | 'rollback' | 'start' | 'stop' | 'open';

/** Exactly what `user` may do with `desktop` now (drives every client's menus). */
export async function allowedActions(ctx: BrokerContext, user: string, desktop: DesktopRow): Promise<Action[]> {
  const policy = await effectivePolicy(ctx.meta, user, desktop);
  const active = await ctx.meta.activeCheckout(desktop.id);
  if (!active) {
    // On a desktop host: stop it while it runs, start it again where it is kept; no check-out meanwhile (hosts/power.ts).
    const online = policy.onlineAllowed.value;
    const placed = await ctx.hosts.placement(desktop.id);
    // Its screen (the console's Open, `carryon open`) for every entitled user while it runs.
    if (placed) {
      // A check-out too: the host hands the desktop over first (hosts/handover.ts).
      const co = policy.checkoutAllowed.value && (placed.state === 'running' || placed.state === 'stopped') ? (['checkout'] as const) : [];
      return placed.state === 'running' ? [...co, ...(online ? (['stop'] as const) : []), 'open'] : [...co, ...(online && placed.state === 'stopped' ? (['start'] as const) : [])];
    }
    return [...(policy.checkoutAllowed.value && desktop.currentSnapshot ? (['checkout'] as const) : []), ...(online && desktop.currentSnapshot ? (['start'] as const) : [])];
  }
  if (active.user !== user) return [];
  switch (active.state) {
    case 'transferring':
      return ['cancel'];
    case 'checked_out':
      return [
        ...(policy.checkinAllowed.value ? (['checkin'] as const) : []),
        'replicate' as const,
        ...(policy.rollbackAllowed.value ? (['rollback'] as const) : []),
      ];
    case 'checking_in':
      return ['checkin'];
    default:
      return [];
  }
}

/** Adapts the desktop's config to the laptop: vCPUs ≤ cores − 1, RAM ≤ host RAM − overhead. */
export function adaptConfig(config: DesktopConfig, host: HostFacts, overheadMiB: number, policy: Pick<PolicyValues, 'usbAllowed' | 'usbClasses' | 'usbAllow' | 'usbDeny' | 'usbStorageAllowed' | 'printingAllowed'>) {
  const vcpus = Math.max(1, Math.min(config.vcpus, host.cpus - 1));
  const hostMiB = Math.floor(host.ramBytes / (1024 * 1024)) - overheadMiB;
  const ramMiB = Math.min(config.ramMiB, hostMiB);
  if (ramMiB < config.minRamMiB) {
    throw new HttpError(422, 'host-too-small', `the laptop can give this desktop ${Math.max(0, hostMiB)} MiB of RAM; it needs at least ${config.minRamMiB} MiB`);
  }
  const usb = policy.usbAllowed && config.usb;
  // The USB rules travel MACed with the check-out (the laptop applies them to every attach); the agent may only narrow them later.
  const usbRules = usb ? { classes: policy.usbClasses, allow: policy.usbAllow, deny: policy.usbDeny, storage: policy.usbStorageAllowed } : undefined;
  return { vcpus, ramMiB, usb, ...(usbRules ? { usbRules } : {}), printing: policy.printingAllowed, nic: config.nic, disks: config.disks };
}


/** Offline lease covering every desktop the user holds on this device and may still use (no cut-off). */
export async function issueLease(ctx: BrokerContext, user: string, deviceId: string): Promise<{ lease: SignedLease; deadline: string } | null> {
  const held = await stillAllowed(ctx, (c) => c.user === user && c.deviceId === deviceId);
  if (held.length === 0) return null;
  const desktops: DesktopRow[] = [];
  for (const c of held) desktops.push((await ctx.meta.getDesktop(c.desktopId))!);
  const policies = await Promise.all(desktops.map((d) => effectivePolicy(ctx.meta, user, d)));
  const hours = Math.min(...policies.map((p) => p.maxLeaseHours.value));
  const deadline = new Date(Date.now() + hours * 3600_000).toISOString();
  for (const c of held) await ctx.meta.transitionCheckout(c.id, [c.state], c.state, { leaseExpiresAt: deadline });
  const lease = signLease(
    { v: 1, user, deviceId, desktops: desktops.map((d) => d.id), deadline, issuedAt: new Date().toISOString(), policyHash: policyHash(policies[0]!) },
    ctx.secrets.signing.privateKey,
  );
  return { lease, deadline };
}

export async function ownedCheckout(ctx: BrokerContext, user: string, checkoutId: string, action: string): Promise<CheckoutRow> {
  const c = await ctx.meta.getCheckout(checkoutId);
  if (!c) throw new HttpError(404, 'not-found', `no checkout ${checkoutId}`);
  if (c.user !== user) {
    await ctx.audit({ actor: user, desktopId: c.desktopId, action, outcome: 'denied', detail: 'checkout held by another user' });
    throw new HttpError(403, 'not-holder', 'you do not hold this checkout');
  }
  return c;
}


/** A snapshot `admin verify` or a failed check-out found damaged is not handed out (the refusal names the newest intact restore point). */
async function refuseDamaged(ctx: BrokerContext, user: string, desktop: DesktopRow, snapshot: SnapshotRow): Promise<void> {
  const refusal = await damagedSnapshotRefusal(ctx, desktop, snapshot.id, snapshot.disks);
  if (refusal) throw await deny(ctx, user, desktop.id, 'checkout', refusal.status, refusal.code, refusal.message);
}

/** Check-out of a desktop the user is entitled to (the desktop scope's hook checked it). */
export async function checkOut(ctx: BrokerContext, user: string, desktop: DesktopRow, req: { deviceId: string; host: HostFacts }) {
  const device = await ctx.meta.getDevice(req.deviceId);
  if (!device || device.user !== user) throw await deny(ctx, user, desktop.id, 'checkout', 403, 'device-not-enrolled', 'this device is not enrolled for you');
  if (await ctx.meta.deviceRevokedAt(device.id)) throw await deny(ctx, user, desktop.id, 'checkout', 403, 'device-revoked', 'this device has been revoked by an administrator');
  const policy = await effectivePolicy(ctx.meta, user, desktop);
  // The same device coming back to a check-out it began (it died before saving its state): resume it.
  const held = await ctx.meta.activeCheckout(desktop.id);
  // …or to one that waits for a host to hand the desktop over: where that stands (202).
  if (held && held.user === user && held.deviceId === device.id && held.state === 'transferring' && !held.jobId && (await ctx.hosts.handover(held.id))) return await waitAnswer(ctx, held.id);
  if (held && held.user === user && held.deviceId === device.id && held.state === 'transferring' && held.jobId) {
    await refuseDamaged(ctx, user, desktop, (await ctx.meta.getSnapshot(held.checkpointSnapshot))!);
    return await resumeCheckOut(ctx, held, desktop, req.host, policy);
  }
  if (!policy.checkoutAllowed.value) throw await deny(ctx, user, desktop.id, 'checkout', 403, 'policy-denied', `policy (${await describePolicySource(ctx.meta, policy.checkoutAllowed.source)}) forbids check-out`);
  if (!desktop.currentSnapshot) throw await deny(ctx, user, desktop.id, 'checkout', 409, 'no-snapshot', 'desktop has no disk image yet');
  const snapshot = (await ctx.meta.getSnapshot(desktop.currentSnapshot))!;
  await refuseDamaged(ctx, user, desktop, snapshot);
  const manifests = await Promise.all(snapshot.disks.map((d) => loadManifest(ctx, d.digest)));
  const need = manifests.reduce((sum, m) => sum + referencedChunks(m).size * m.chunkSize, 0);
  if (req.host.freeDiskBytes < need) throw await deny(ctx, user, desktop.id, 'checkout', 422, 'not-enough-disk', `the laptop has ${req.host.freeDiskBytes} bytes free; this desktop needs up to ${need}`);
  let config;
  try {
    config = adaptConfig(desktop.config, req.host, ctx.settings.hypervisorOverheadMiB, policyValues(policy));
  } catch (err) {
    if (err instanceof HttpError) throw await deny(ctx, user, desktop.id, 'checkout', err.status, err.code, err.message);
    throw err;
  }
  await ctx.audit({ actor: user, desktopId: desktop.id, action: 'validate', outcome: 'ok', detail: `device ${device.id}` });

  // Lock first (the database's unique index decides races), then power down and checkpoint.
  const checkoutId = await ctx.meta.insertCheckout({ desktopId: desktop.id, user, deviceId: device.id, checkpointSnapshot: snapshot.id, leaseExpiresAt: new Date().toISOString() });
  if (!checkoutId) throw await deny(ctx, user, desktop.id, 'checkout', 409, 'already-checked-out', `${desktop.name} is already checked out`);
  await ctx.audit({ actor: user, desktopId: desktop.id, action: 'lock', outcome: 'ok', detail: `checkout ${checkoutId}` });
  // Checked after the lock (a power-on checks the lock after placing): one of two racing requests sees the other.
  // A desktop on a host: the host hands it over first (hosts/handover.ts); the laptop waits (202) for the checkpoint.
  const placed = await ctx.hosts.placement(desktop.id);
  if (placed) return await askHandover(ctx, user, desktop, checkoutId, placed);
  try {
    if (await ctx.hypervisor.isRunning(desktop.id)) {
      await ctx.hypervisor.powerOff(desktop.id);
      await ctx.meta.setPowerState(desktop.id, 'off');
      await ctx.audit({ actor: user, desktopId: desktop.id, action: 'power-off', outcome: 'ok' });
    }
  } catch (err) {
    await ctx.meta.transitionCheckout(checkoutId, ['transferring'], 'cancelled');
    await ctx.audit({ actor: user, desktopId: desktop.id, action: 'power-off', outcome: 'failed', detail: (err as Error).message });
    throw new HttpError(503, 'power-off-failed', `could not power the datacenter copy down: ${(err as Error).message}`);
  }
  const checkpoint = await ctx.meta.createSnapshot({ desktopId: desktop.id, parentId: snapshot.id, kind: 'checkpoint', disks: snapshot.disks });
  await ctx.meta.setDesktopSnapshot(desktop.id, checkpoint);
  await ctx.meta.setCheckoutCheckpoint(checkoutId, checkpoint);
  await ctx.audit({ actor: user, desktopId: desktop.id, action: 'snapshot', outcome: 'ok', detail: `checkpoint ${checkpoint}` });
  const keyRef = await lineageKeysFor(ctx, desktop);
  const job = await ctx.scheduler.enqueue({ kind: 'checkout', checkoutId, desktopId: desktop.id, manifests: snapshot.disks.map((d) => d.digest), ...keyRef });
  await ctx.meta.transitionCheckout(checkoutId, ['transferring'], 'transferring', { jobId: job.id });
  await ctx.audit({ actor: user, desktopId: desktop.id, action: 'transfer-start', outcome: 'ok', detail: `job ${job.id} ${job.state}` });
  await auditTicket(ctx, user, desktop.id, job);
  const lease = (await issueLease(ctx, user, device.id))!;
  const keys = await unwrapForUser(ctx, desktop);
  const row = (await ctx.meta.getCheckout(checkoutId))!;
  return {
    checkout: checkoutView(row),
    lease: lease.lease,
    keys,
    unlock: unlockShare(ctx.secrets.masterKey, row),
    config,
    policy,
    disks: snapshot.disks.map((d, i) => ({ name: d.name, digest: d.digest, manifest: encodeManifest(manifests[i]!).toString('base64') })),
    job,
  };
}


/** The 201 answer again for a check-out in flight, with a live job (a new one if it had ended). */
async function resumeCheckOut(ctx: BrokerContext, c: CheckoutRow, desktop: DesktopRow, host: HostFacts, policy: Awaited<ReturnType<typeof effectivePolicy>>) {
  const snapshot = (await ctx.meta.getSnapshot(c.checkpointSnapshot))!;
  const manifests = await Promise.all(snapshot.disks.map((d) => loadManifest(ctx, d.digest)));
  let config;
  try {
    config = adaptConfig(desktop.config, host, ctx.settings.hypervisorOverheadMiB, policyValues(policy));
  } catch (err) {
    if (err instanceof HttpError) throw await deny(ctx, c.user, desktop.id, 'checkout', err.status, err.code, err.message);
    throw err;
  }
  let job = await ctx.scheduler.get(c.jobId!);
  if (!job || ['done', 'cancelled', 'failed'].includes(job.state)) {
    job = await ctx.scheduler.enqueue({ kind: 'checkout', checkoutId: c.id, desktopId: desktop.id, manifests: snapshot.disks.map((d) => d.digest), ...(await lineageKeysFor(ctx, desktop)) });
    await ctx.meta.transitionCheckout(c.id, ['transferring'], 'transferring', { jobId: job.id });
  }
  await ctx.audit({ actor: c.user, desktopId: desktop.id, action: 'checkout-resume', outcome: 'ok', detail: `checkout ${c.id} on device ${c.deviceId}, job ${job.id} ${job.state}` });
  await auditTicket(ctx, c.user, desktop.id, job);
  const lease = (await issueLease(ctx, c.user, c.deviceId))!;
  return {
    checkout: checkoutView((await ctx.meta.getCheckout(c.id))!),
    lease: lease.lease,
    keys: await unwrapForUser(ctx, desktop),
    unlock: unlockShare(ctx.secrets.masterKey, c),
    config,
    policy,
    disks: snapshot.disks.map((d, i) => ({ name: d.name, digest: d.digest, manifest: encodeManifest(manifests[i]!).toString('base64') })),
    job,
  };
}

async function unwrapForUser(ctx: BrokerContext, desktop: DesktopRow): Promise<string> {
  const { wrappedKeys, keyContext } = await lineageKeysFor(ctx, desktop);
  // Lineage keys go to the authenticated holder over TLS; the laptop re-wraps them at rest.
  return ctx.keysFor(Buffer.from(wrappedKeys, 'base64'), keyContext);
}


export async function markTransferred(ctx: BrokerContext, c: CheckoutRow) {
  const user = c.user;
  if (!await ctx.meta.transitionCheckout(c.id, ['transferring'], 'checked_out')) {
    if (c.state === 'checked_out') return checkoutView(c);
    throw await deny(ctx, user, c.desktopId, 'transfer-end', 409, 'wrong-state', `checkout is ${c.state}`);
  }
  if (c.jobId) await ctx.scheduler.finish(c.jobId, 'done');
  await ctx.audit({ actor: user, desktopId: c.desktopId, action: 'transfer-end', outcome: 'ok', detail: 'checked out' });
  return checkoutView((await ctx.meta.getCheckout(c.id))!);
}

export async function cancel(ctx: BrokerContext, c: CheckoutRow) {
  const user = c.user;
  if (!await ctx.meta.transitionCheckout(c.id, ['transferring'], 'cancelled')) throw await deny(ctx, user, c.desktopId, 'cancel', 409, 'wrong-state', `only a check-out in flight can be cancelled (it is ${c.state})`);
  // Every job of it (a handover's prefetch too): their tickets stop working; a laptop waiting on the handover hears at once.
  await ctx.scheduler.finishForCheckout(c.id, 'cancelled');
  ctx.hosts.wakeHandover(c.id);
  await ctx.audit({ actor: user, desktopId: c.desktopId, action: 'unlock', outcome: 'ok', detail: 'cancelled' });
  return checkoutView((await ctx.meta.getCheckout(c.id))!);
}

export async function rollback(ctx: BrokerContext, c: CheckoutRow) {
  const user = c.user;
  const desktop = (await ctx.meta.getDesktop(c.desktopId))!;
  const policy = await effectivePolicy(ctx.meta, user, desktop);
  if (!policy.rollbackAllowed.value) throw await deny(ctx, user, c.desktopId, 'rollback', 403, 'policy-denied', `policy (${await describePolicySource(ctx.meta, policy.rollbackAllowed.source)}) forbids rollback`);
  if (!await ctx.meta.transitionCheckout(c.id, ['checked_out', 'checking_in'], 'rolled_back', { pendingDisks: null })) throw await deny(ctx, user, c.desktopId, 'rollback', 409, 'wrong-state', `checkout is ${c.state}`);
  await ctx.scheduler.finishForCheckout(c.id, 'cancelled');
  await ctx.audit({ actor: user, desktopId: c.desktopId, action: 'unlock', outcome: 'ok', detail: 'rolled back: offline changes discarded' });
  return checkoutView((await ctx.meta.getCheckout(c.id))!);
}

export async function forceUnlock(ctx: BrokerContext, admin: string, checkoutId: string, reason?: string) {
  const c = await ctx.meta.getCheckout(checkoutId);
  if (!c) throw new HttpError(404, 'not-found', `no checkout ${checkoutId}`);
  if (!await ctx.meta.transitionCheckout(c.id, ['transferring', 'checked_out', 'checking_in'], 'cancelled', { pendingDisks: null })) throw new HttpError(409, 'wrong-state', `checkout is ${c.state}`);
  await ctx.scheduler.finishForCheckout(c.id, 'cancelled');
  ctx.hosts.wakeHandover(c.id);
  await ctx.audit({ actor: admin, desktopId: c.desktopId, action: 'force-unlock', outcome: 'ok', detail: `checkout ${c.id} held by ${c.user}${reason ? `: ${reason}` : ''}` });
  return checkoutView((await ctx.meta.getCheckout(c.id))!);
}

/**
 * Check-in or replicate, step 1: open an upload job. The laptop sends the pages it wrote, the
 * transfer server names the chunks it rebuilds (each with a push receipt), and the commit carries
 * the changes and their receipts (`commitUpload`).
 */
export async function beginUpload(ctx: BrokerContext, c: CheckoutRow, kind: 'checkin' | 'replicate', opts: { background?: boolean } = {}): Promise<{ job: JobView }> {
  const user = c.user;
  const desktop = (await ctx.meta.getDesktop(c.desktopId))!;
  if (kind === 'checkin') {
    const policy = await effectivePolicy(ctx.meta, user, desktop);
    if (!policy.checkinAllowed.value) throw await deny(ctx, user, c.desktopId, kind, 403, 'policy-denied', `policy (${await describePolicySource(ctx.meta, policy.checkinAllowed.source)}) forbids check-in: discard (rollback) instead`);
  }
  const okStates = kind === 'checkin' ? ['checked_out', 'checking_in'] : ['checked_out'];
  if (!okStates.includes(c.state)) throw await deny(ctx, user, c.desktopId, kind, 409, 'wrong-state', `checkout is ${c.state}`);
  const base = (await ctx.meta.getSnapshot(c.checkpointSnapshot))!;
  if (c.jobId) await ctx.scheduler.finish(c.jobId, 'cancelled');
  // The ticket's manifests are the checkpoint's: the server serves nothing else as a base.
  const digests = base.disks.map((b) => b.digest);
  const background = kind === 'replicate' && opts.background === true;
  const job = await ctx.scheduler.enqueue({ kind, checkoutId: c.id, desktopId: c.desktopId, manifests: digests, baseManifests: digests, ...(background ? { background } : {}), ...(await lineageKeysFor(ctx, desktop)) });
  const to = kind === 'checkin' ? 'checking_in' : 'checked_out';
  // Until the commit says otherwise, the upload's result is the checkpoint itself.
  if (!await ctx.meta.transitionCheckout(c.id, [c.state], to, { jobId: job.id, pendingDisks: base.disks })) throw await deny(ctx, user, c.desktopId, kind, 409, 'wrong-state', 'checkout changed meanwhile');
  await ctx.audit({ actor: user, desktopId: c.desktopId, action: 'transfer-start', outcome: 'ok', detail: `${kind} job ${job.id}${background ? ' (background)' : ''}` });
  await auditTicket(ctx, user, c.desktopId, job);
  return { job };
}


/**
 * Step 2: `changes` are applied to the checkpoint's manifests; each new chunk must be the
 * checkpoint's or carry a valid push receipt for this check-out (the transfer server's word that
 * this check-out pushed it), and those must be in the store; then the snapshot, and for check-in
 * the unlock.
 */
export async function commitUpload(ctx: BrokerContext, user: string, checkoutId: string, kind: 'checkin' | 'replicate', changes: DiskChanges[] = [], receipts: Record<string, string> = {}) {
  // Read again, not the holder hook's row: the body may have taken minutes on a slow link, and the
  // commit acts on the check-out as it is now.
  const c = await ownedCheckout(ctx, user, checkoutId, `${kind}-commit`);
  const expected = kind === 'checkin' ? 'checking_in' : 'checked_out';
  if (c.state !== expected || !c.pendingDisks) throw await deny(ctx, user, c.desktopId, `${kind}-commit`, 409, 'wrong-state', `nothing to commit (checkout is ${c.state})`);
  const base = (await ctx.meta.getSnapshot(c.checkpointSnapshot))!;
  const pendingDisks = await checkedChanges(ctx, user, c, `${kind}-commit`, base.disks, changes, receipts);
  // At most once: the snapshot and the state change that consumes the pending disks are one
  // transaction, so a commit sent twice (a laptop failing over to another broker after a lost
  // answer, the first still running) records one snapshot and answers the other 409.
  const snapshotId = await ctx.meta.transaction(async (tx) => {
    const id = await tx.createSnapshot({ desktopId: c.desktopId, parentId: c.checkpointSnapshot, kind: kind === 'checkin' ? 'checkin' : 'replica', disks: pendingDisks });
    // Check-in unlocks; a restore point becomes the base of the next diff and the desktop stays locked.
    const moved = kind === 'checkin'
      ? await tx.transitionCheckout(c.id, ['checking_in'], 'checked_in', { pendingDisks: null, jobId: null })
      : await tx.setCheckoutCheckpoint(c.id, id, { endUpload: true });
    if (!moved) throw new HttpError(409, 'wrong-state', 'this upload has been committed meanwhile');
    await tx.setDesktopSnapshot(c.desktopId, id);
    return id;
  });
  await ctx.audit({ actor: user, desktopId: c.desktopId, action: 'snapshot', outcome: 'ok', detail: `${kind} ${snapshotId}` });
  if (c.jobId) await ctx.scheduler.finish(c.jobId, 'done');
  await ctx.audit({ actor: user, desktopId: c.desktopId, action: 'transfer-end', outcome: 'ok', detail: kind });
  if (kind === 'checkin') {
    await ctx.audit({ actor: user, desktopId: c.desktopId, action: 'unlock', outcome: 'ok', detail: 'checked in' });
    await startAfterCheckin(ctx, user, c.desktopId);
  }
  return { snapshotId, checkout: checkoutView((await ctx.meta.getCheckout(c.id))!) };
}
