import { join } from 'node:path';
import { z } from 'zod';
import { CarryonError } from '../core/errors.js';
import { decodeLineageKeys } from '../core/keys.js';
import { verifyLease } from '../core/lease.js';
import { publicKeyFromBase64 } from '../core/signing.js';
import { newDesktopKeys, type DesktopKeys } from './desktop-keys.js';
import { LEASE, mintToken } from './guards.js';
import { resetClock } from './key-release.js';
import { decodeManifest, encodeManifest, manifestDigest } from '../core/manifest.js';
import { baseBlockdev, convertChain, topExtents } from '../disk/chain.js';
import { addChain, addLayer, StorageDaemon } from '../disk/storage-daemon.js';
import { NbdClient } from '../nbd/client.js';
import { TransferSession, uploadChunks, type Progress } from '../transfer/client.js';
import { fillDirect } from './fill-direct.js';
import { commitUpload } from './commit.js';
import { retryTransfer } from './retry.js';
import { recordEvent } from './events.js';
import type { RateLimiter } from '../transfer/rate-limit.js';
import { BrokerClient, BrokerError, CheckoutResponse, CheckoutView, DesktopEntry, JobView } from './broker-client.js';
import { brokerEndpoints, hostFacts, loadDevice, type DeviceIdentity } from './home.js';
import { writeFileAtomic } from '../store/files.js';
import { Vault, type DesktopState } from './vault.js';
import { collectChanges, type DiskReader } from './changes.js';
import { chainOf, createMissingLayers, diskDir, openDesktopDisks, readDiskFailures, readFillReport, topBytes, writeFillReport, socketDir, type DesktopDisk } from './disks.js';
import { claimOwner, diskPrefix, specFor } from './holder.js';
import { createPublicKey, type KeyObject } from 'node:crypto';

export interface ClientEnv {
  home: string;
  user?: string;
  password: () => Promise<string>;
  log: (line: string) => void;
  onProgress?: (label: string, p: Progress) => void;
  signal?: AbortSignal;
  /** Shared cap on transfer bytes per second (`--limit-rate`). */
  rateLimit?: RateLimiter;
  /** Poll interval while a job waits for a transfer slot. */
  pollMs?: number;
}

export { enroll } from './brokers.js';

/**
 * The broker's lease-signing key, as the broker states it over the pinned TLS connection; it
 * must agree with the one pinned at enrolment. It is then pinned again inside each vault wrap.
 */
async function pinnedBrokerKey(broker: BrokerClient, device: DeviceIdentity): Promise<KeyObject> {
  const info = await broker.call('GET', '/v1/broker', undefined, z.object({ signingPublicKey: z.string() }).loose());
  if (info.signingPublicKey !== device.info.signingPublicKey) throw new CarryonError('pin-mismatch', 'the broker\'s signing key differs from the one pinned at enrolment (device.json altered, or another broker): re-enrol');
  return publicKeyFromBase64(info.signingPublicKey);
}

/** An online session for `env.user` on this device (always a fresh password check). */
export async function onlineSession(env: ClientEnv): Promise<{ device: DeviceIdentity; broker: BrokerClient; user: string }> {
  const device = await loadDevice(env.home);
  const broker = new BrokerClient(brokerEndpoints(device.info), '', env.log);
  const user = env.user ?? (() => { throw new CarryonError('invalid', 'this needs --user (or CARRYON_USER)'); })();
  try {
    await broker.login(user, await env.password(), device.info.deviceId!);
  } catch (err) {
    await broker.close();
    throw err;
  }
  return { device, broker, user };
}

/**
 * Online login: checks the password with the broker and, with the fresh lease it returns, renews
 * each held desktop's lease and re-establishes its trusted clock from the broker's time (the way
 * back from a missing clock record or a lease that ran out).
 */
export async function loginOnline(env: ClientEnv): Promise<{ user: string; renewed: string[] }> {
  const device = await loadDevice(env.home);
  const broker = new BrokerClient(brokerEndpoints(device.info), '', env.log);
  const user = env.user ?? (() => { throw new CarryonError('invalid', 'this needs --user (or CARRYON_USER)'); })();
  const password = await env.password();
  const renewed: string[] = [];
  try {
    const { lease } = await broker.login(user, password, device.info.deviceId!);
    const vault = await Vault.open(env.home);
    for (const s of lease ? await vault.list() : []) {
      const { keys, state } = await vault.openKeys(device, password, s);
      let issuedAt: string;
      try {
        issuedAt = verifyLease(lease, keys.brokerKey, { now: new Date(), deviceId: device.info.deviceId!, desktopId: s.desktopId }).issuedAt;
      } catch (err) {
        if ((err as CarryonError).code === 'lease-not-covered') continue;
        throw err;
      }
      await writeFileAtomic(join(vault.desktopDir(s.desktopId), LEASE), JSON.stringify(lease));
      await resetClock(vault, state, keys, issuedAt);
      renewed.push(s.name);
    }
  } finally {
    await broker.close();
  }
  return { user, renewed };
}

export async function listDesktops(env: ClientEnv) {
  const { broker } = await onlineSession(env);
  try {
    return (await broker.call('GET', '/v1/desktops', undefined, z.object({ desktops: z.array(DesktopEntry) }))).desktops;
  } finally {
    await broker.close();
  }
}

/** Waits for a transfer slot (reporting the queue position), then returns the active job. */
async function activeJob(env: ClientEnv, broker: BrokerClient, job: JobView): Promise<JobView> {
  for (let i = 0; i < 100_000; i++) {
    if (job.state === 'active' && job.transfer) return job;
    if (['done', 'cancelled', 'failed'].includes(job.state)) throw new CarryonError('job-ended', `transfer job ${job.id} is ${job.state}`);
    if (job.state === 'queued') env.log(`waiting for a transfer slot: position ${job.queuePosition ?? '?'} in the queue`);
    if (env.signal?.aborted) throw new CarryonError('aborted', 'stopped while waiting for a slot');
    await new Promise((r) => setTimeout(r, env.pollMs ?? 1000));
    job = await broker.call('GET', `/v1/jobs/${job.id}`, undefined, JobView);
  }
  throw new CarryonError('timeout', 'no transfer slot became free');
}

function renewer(broker: BrokerClient, jobId: string) {
  return async () => {
    const j = await broker.call('GET', `/v1/jobs/${jobId}`, undefined, JobView);
    if (!j.transfer) throw new CarryonError('job-ended', `job ${jobId} is ${j.state}`);
    return j.transfer;
  };
}


/** Looks up the desktop on the broker (by name or id) among those the user may use. */
async function findEntry(broker: BrokerClient, ref: string) {
  const desktops = (await broker.call('GET', '/v1/desktops', undefined, z.object({ desktops: z.array(DesktopEntry) }))).desktops;
  const entry = desktops.find((d) => d.name === ref || d.id === ref);
  if (!entry) throw new CarryonError('not-found', `no desktop ${ref} you are entitled to`);
  return entry;
}

/**
 * Check-out: the broker locks the desktop and names the checkpoint; the laptop makes an empty
 * encrypted chain per disk and fills each base from the transfer server. Interrupted (Ctrl-C,
 * kill, lost link), it resumes where the base stopped.
 */
export async function checkout(env: ClientEnv, desktopRef: string) {
  const { device, broker, user } = await onlineSession(env);
  const vault = await Vault.open(env.home);
  try {
    const entry = await findEntry(broker, desktopRef);
    const found = (await vault.list()).find((s) => s.desktopId === entry.id);
    let state: DesktopState;
    let keys: DesktopKeys;
    if (found && found.state === 'transferring') {
      ({ keys, state } = await vault.openKeys(device, await env.password(), found));
      env.log(`resuming the check-out of ${entry.name}`);
    } else {
      if (found) {
        // Nothing left to do (e.g. `carryon serve` or `run` finished the download): say so, succeed.
        env.log(`${entry.name} is already checked out to this device and entirely local`);
        return { desktopId: entry.id, checkoutId: found.checkoutId, chunksMoved: 0, bytesMoved: 0, refetched: 0 };
      }
      const brokerKey = await pinnedBrokerKey(broker, device);
      const host = await hostFacts(env.home);
      // Repeatable: a check-out this device began and that is still transferring is resumed by
      // the broker (same check-out, same job), not refused or started twice (broker/checkouts.ts).
      const res = await broker.call('POST', `/v1/desktops/${entry.id}/checkout`, { deviceId: device.info.deviceId, host: { os: host.os, cpus: host.cpus, ramBytes: host.ramBytes, freeDiskBytes: host.freeDiskBytes } }, CheckoutResponse, {}, { repeatable: true });
      // The lease must verify against the broker key pinned now, inside the vault, before anything is kept.
      const lease = verifyLease(res.lease, brokerKey, { now: new Date(), deviceId: device.info.deviceId!, desktopId: entry.id });
      keys = newDesktopKeys(decodeLineageKeys(res.keys), brokerKey, createPublicKey(device.privateKey));
      const disks: DesktopState['disks'] = [];
      for (const d of res.disks) {
        const m = decodeManifest(Buffer.from(d.manifest, 'base64'));
        if (manifestDigest(m) !== d.digest) throw new CarryonError('bad-manifest', `manifest of ${d.name} does not match its digest`);
        await vault.putManifest(entry.id, m);
        disks.push({ name: d.name, baseDigest: d.digest, complete: false, mergingTo: null });
      }
      state = {
        desktopId: entry.id, name: entry.name, user, checkoutId: res.checkout.id, state: 'transferring', jobId: res.job.id,
        keys: await Vault.wrapKeys(device, await env.password(), keys, entry.id), lease: res.lease,
        config: { ...res.config, exportAllowed: res.policy?.exportAllowed?.value === true }, localConfig: await vault.readLocalConfig(entry.id), disks,
        lastReplicationAt: null, lockDigest: await mintToken(vault.desktopDir(entry.id)),
      };
      await vault.save(state, keys);
      await resetClock(vault, state, keys, lease.issuedAt);
      env.log(`checked out ${entry.name}: checkout ${res.checkout.id}, lease until ${res.checkout.leaseExpiresAt}`);
    }
    const release = await claimOwner(vault, state.desktopId, 'checkout', env.log);
    let making: Promise<void> = Promise.resolve();
    try {
      const { tops } = await diskFullIsClear(env.home, () => createMissingLayers(vault, state, keys));
      making = tops;
      const filled = await fillFromBroker(env, vault, broker, state, keys);
      await diskFullIsClear(env.home, () => tops);
      if (!filled.complete) throw new CarryonError('paused', 'check-out stopped; what arrived is kept — run the same command again to resume');
      // Repeatable: a check-out already marked transferred is answered as it is.
      await broker.call('POST', `/v1/checkouts/${state.checkoutId}/transferred`, {}, z.object({ checkout: CheckoutView }), {}, { repeatable: true });
      await vault.save({ ...filled.state, state: 'checked_out', jobId: null }, keys);
      env.log(`${entry.name} is local (${filled.bytesMoved} bytes pulled); safe to go offline`);
      return { desktopId: entry.id, checkoutId: state.checkoutId, chunksMoved: filled.chunksMoved, bytesMoved: filled.bytesMoved, refetched: 0 };
    } finally {
      // A top still being made belongs to this run: let it finish (or fail) before anyone else looks.
      await making.catch(() => undefined);
      await release();
    }
  } finally {
    await broker.close();
  }
}

/**
 * Fills every incomplete base over the job's transfer ticket: no VM is attached, so the chunks
 * go straight into the bases (parallel streams, QEMU encrypting), holes never touched.
 */
async function fillFromBroker(env: ClientEnv, vault: Vault, broker: BrokerClient, state: DesktopState, keys: DesktopKeys) {
  const opened = await openDesktopDisks(vault, state, keys);
  const incomplete = opened.disks.filter((d) => !d.entry.complete);
  if (incomplete.length === 0) return { state: opened.state, complete: true, bytesMoved: 0, chunksMoved: 0 };
  const job = await activeJob(env, broker, await broker.call('GET', `/v1/jobs/${state.jobId}`, undefined, JobView));
  const session = new TransferSession(job.transfer!, renewer(broker, job.id));
  const dir = await socketDir(vault, state.desktopId);
  let qsd: StorageDaemon | null = null;
  try {
    qsd = await StorageDaemon.start(dir);
    // The bases alone: their tops may still be in the making.
    for (const [i, d] of opened.disks.entries()) if (!d.entry.complete) await addLayer(qsd, baseBlockdev(specFor(d, i, null)), `sec-${diskPrefix(i)}`, d.chain.secret);
    const socketPath = join(dir, 'fill.sock');
    await qsd.exportNbd(socketPath, opened.disks.flatMap((d, i) => (d.entry.complete ? [] : [{ node: `${diskPrefix(i)}-base`, name: `${d.name}.fill`, writable: true }])));
    const renew = renewer(broker, job.id);
    let lastReport = 0;
    const moved = await diskFullIsClear(env.home, () => retryTransfer({ what: 'check-out', log: env.log, signal: env.signal, beforeRetry: async () => session.setEndpoint(await renew()) }, () =>
      fillDirect({ disks: incomplete.map((disk) => ({ disk, dir: diskDir(vault, state.desktopId, disk.name), socketPath })), session, keys, signal: env.signal, rateLimit: env.rateLimit, onProgress: (p) => {
        env.onProgress?.('check-out', p);
        // For `status` in another process: once a second is enough (each report is a file replaced atomically).
        if (Date.now() - lastReport < 1000) return;
        lastReport = Date.now();
        void writeFillReport(vault, state.desktopId, { pid: process.pid, done: p.chunksDone, total: p.chunksTotal, updatedAt: new Date().toISOString(), failures: [] }).catch(() => undefined);
      } }),
    ));
    const done: DesktopState = { ...opened.state, disks: opened.state.disks.map((d) => ({ ...d, complete: true })) };
    await vault.save(done, keys);
    return { state: done, complete: true, ...moved };
  } catch (err) {
    if ((err as CarryonError).code === 'aborted') return { state: opened.state, complete: false, bytesMoved: 0, chunksMoved: 0 };
    throw err;
  } finally {
    await qsd?.stop();
    await session.close();
  }
}

/** A full disk mid-transfer says so, and how to go on (what arrived is kept; the rerun resumes). */
async function diskFullIsClear<T>(home: string, fn: () => Promise<T>): Promise<T> {
  try {
    return await fn();
  } catch (err) {
    const code = (err as { code?: string }).code;
    const text = (err as Error).message ?? '';
    if (code !== 'ENOSPC' && code !== 'SQLITE_FULL' && !/No space left on device/i.test(text)) throw err;
    const { freeDiskBytes } = await hostFacts(home).catch(() => ({ freeDiskBytes: 0 }));
    throw new CarryonError('disk-full', `the disk holding ${home} is full (${Math.floor(freeDiskBytes / 1024)} KiB free): free some space and run \`carryon checkout\` again; what arrived is kept`);
  }
}

/**
 * Opens the chains read-only in a storage daemon and reads the change since the checkpoint:
 * the top layer's extents, each touched chunk read through the chain. Refused while the
 * desktop runs (its disk is locked by QEMU): shut it down first.
 */
async function withReaders<T>(vault: Vault, state: DesktopState, disks: DesktopDisk[], fn: (readers: DiskReader[]) => Promise<T>): Promise<T> {
  const dir = await socketDir(vault, state.desktopId);
  const qsd = await StorageDaemon.start(dir);
  const clients: NbdClient[] = [];
  try {
    for (const [i, d] of disks.entries()) await addChain(qsd, specFor(d, i, null, true), d.chain.secret);
    const socket = join(dir, 'upload.sock');
    await qsd.exportNbd(socket, disks.flatMap((d, i) => [{ node: `${diskPrefix(i)}-top`, name: d.name, writable: false }, { node: `${diskPrefix(i)}-base`, name: `${d.name}.base`, writable: false }]));
    const readers: DiskReader[] = [];
    for (const d of disks) {
      const top = await NbdClient.connect(socket, d.name);
      clients.push(top);
      const base = await NbdClient.connect(socket, `${d.name}.base`);
      clients.push(base);
      readers.push({ disk: d, top, base });
    }
    return await fn(readers);
  } finally {
    for (const c of clients) await c.close();
    await qsd.stop();
  }
}

/** Check-in or replicate: send only the chunks changed since the checkpoint, then commit. */
export async function upload(env: ClientEnv, desktopRef: string, kind: 'checkin' | 'replicate') {
  const { device, broker } = await onlineSession(env);
  const vault = await Vault.open(env.home);
  try {
    const found = await vault.find(desktopRef);
    if (found.state === 'transferring') throw new CarryonError('wrong-state', `${found.name} is still being checked out`);
    const opened0 = await vault.openKeys(device, await env.password(), found);
    const keys = opened0.keys;
    let state = opened0.state;
    const release = await claimOwner(vault, state.desktopId, kind, env.log);
    let outcome;
    try {
      const opened = await openDesktopDisks(vault, state, keys);
      state = opened.state;
      outcome = await withReaders(vault, state, opened.disks, async (readers) => {
        const changes = await collectChanges(readers, keys);
        // The version this upload is based on: how a commit whose answer was lost is recognised.
        const checkpoint = (await findEntry(broker, state.desktopId)).checkout?.snapshotId ?? null;
        let begin;
        try {
          // Repeatable: a second begin (also accepted in checking_in) ends the first one's job and opens another.
          begin = await broker.call('POST', `/v1/checkouts/${state.checkoutId}/${kind}`, { disks: changes.manifests.map((d) => ({ name: d.name, manifest: encodeManifest(d.manifest).toString('base64') })) }, z.object({ job: JobView }), {}, { repeatable: true });
        } catch (err) {
          if (err instanceof BrokerError && (err.code === 'wrong-state' || err.code === 'not-found' || err.code === 'not-held')) {
            // Never delete offline work on an ambiguous answer: the user decides what happens to it.
            throw new CarryonError('checkout-gone', `the broker no longer holds check-out ${state.checkoutId} of ${state.name} (${err.message}). Your offline changes are kept on this laptop: save them with \`carryon export ${state.name} <file>\`, then remove the local copy with \`carryon discard ${state.name} --yes\``);
          }
          throw err;
        }
        if (kind === 'checkin') await vault.save({ ...state, state: 'checking_in', jobId: begin.job.id }, keys);
        const job = await activeJob(env, broker, begin.job);
        let endpoint = job.transfer!;
        const sent = await retryTransfer({ what: kind, log: env.log, signal: env.signal, beforeRetry: async () => { endpoint = await renewer(broker, job.id)(); } }, () => uploadChunks({ endpoint, ids: [...changes.changed.keys()], source: changes.source, keys, signal: env.signal, rateLimit: env.rateLimit, renew: renewer(broker, job.id), onProgress: (p) => env.onProgress?.(kind, p) }));
        const commit = await commitUpload(broker, state, kind, checkpoint);
        return { changes, sent, commit };
      });
      if (kind === 'replicate') {
        // The restore point becomes the base: merge the top into it (resumed on the next open if killed).
        let next: DesktopState = { ...state, lastReplicationAt: new Date().toISOString() };
        for (const m of outcome.changes.manifests) {
          const digest = await vault.putManifest(state.desktopId, m.manifest);
          next = { ...next, disks: next.disks.map((d) => (d.name === m.name ? { ...d, mergingTo: digest } : d)) };
        }
        await vault.save(next, keys);
        await openDesktopDisks(vault, next, keys);
      }
    } finally {
      await release();
    }
    const { changes, sent, commit } = outcome;
    if (kind === 'checkin') {
      await vault.wipe(state.desktopId);
      env.log(`checked in ${state.name}: ${changes.changedChunks} changed chunks, ${sent.chunksMoved} sent (${sent.bytesMoved} bytes); snapshot ${commit.snapshotId}`);
    } else {
      env.log(`replicated ${state.name}: restore point ${commit.snapshotId}, ${sent.chunksMoved} chunks sent (${sent.bytesMoved} bytes)`);
    }
    return { snapshotId: commit.snapshotId, changedChunks: changes.changedChunks, chunksSent: sent.chunksMoved, bytesSent: sent.bytesMoved };
  } finally {
    await broker.close();
  }
}

/** Rollback (discard offline changes) or cancel (stop a check-out in flight): both unlock. */
export async function release(env: ClientEnv, desktopRef: string, how: 'rollback' | 'cancel') {
  const { broker } = await onlineSession(env);
  const vault = await Vault.open(env.home);
  try {
    const state = await vault.find(desktopRef);
    const owner = await claimOwner(vault, state.desktopId, how === 'cancel' ? 'serve' : 'checkin', env.log);
    try {
      await broker.call('POST', `/v1/checkouts/${state.checkoutId}/${how}`, {}, z.object({ checkout: CheckoutView }));
    } finally {
      await owner();
    }
    await vault.wipe(state.desktopId);
    env.log(how === 'rollback' ? `rolled back ${state.name}: offline changes discarded, desktop unlocked` : `cancelled the check-out of ${state.name}`);
    return { desktopId: state.desktopId, state: how === 'rollback' ? 'rolled_back' : 'cancelled' };
  } finally {
    await broker.close();
  }
}

/** Removes a desktop's local copy after the user said so explicitly (e.g. the broker no longer holds its check-out). */
export async function discardLocal(env: ClientEnv, desktopRef: string) {
  const vault = await Vault.open(env.home);
  const state = await vault.find(desktopRef);
  const owner = await claimOwner(vault, state.desktopId, 'checkin', env.log);
  await owner();
  await vault.wipe(state.desktopId);
  env.log(`removed the local copy of ${state.name}`);
  return { desktopId: state.desktopId, state: 'discarded' };
}

/**
 * Offline-capable, and never fails for a desktop that cannot open: a locked desktop or an
 * expired lease is shown with what to do, not raised.
 */
export async function status(env: ClientEnv, desktopRef?: string) {
  const device = await loadDevice(env.home);
  const vault = await Vault.open(env.home);
  const states = desktopRef ? [await vault.find(desktopRef)] : await vault.list();
  const password = states.length > 0 ? await env.password() : '';
  const out = [];
  for (const s of states) {
    let leaseDeadline: string | null = null;
    let problem: string | null = null;
    let dirtyBytes: number | null = null;
    try {
      const { lease, keys } = await vault.unlock(device, password, s);
      leaseDeadline = lease.deadline;
      // Exact change since the checkpoint: the top layer's allocated bytes (read shared, so a running VM is fine).
      dirtyBytes = 0;
      for (const d of s.disks) for (const e of await topExtents(chainOf(vault, s, keys, d.name))) dirtyBytes += e.length;
    } catch (err) {
      if (!(err instanceof CarryonError)) throw err;
      problem = err.code === 'desktop-locked' ? `locked: connect to the broker (\`carryon login\`, then \`carryon agent --once\`); ${err.message}` : err.code === 'lease-expired' ? `offline lease expired: connect and run \`carryon login\` to renew it (${err.message})` : err.message;
      if (err.code === 'vault-locked' || err.code === 'kdf-refused' || err.code === 'tpm') throw err;
    }
    const complete = s.disks.every((d) => d.complete);
    const fill = complete ? null : await readFillReport(vault, s.desktopId);
    const percentLocal = complete ? 100 : fill && fill.total > 0 ? (100 * fill.done) / fill.total : 0;
    const failures = await readDiskFailures(vault, s.desktopId);
    out.push({
      desktop: s.name, desktopId: s.desktopId, state: (await vault.isLocked(await vault.find(s.desktopId))) ? 'locked' : s.state, leaseDeadline,
      leaseHoursLeft: leaseDeadline ? Math.max(0, (Date.parse(leaseDeadline) - Date.now()) / 3_600_000) : 0, dirtyBytes: dirtyBytes ?? (await topBytes(vault, s)), percentLocal,
      lastReplicationAt: s.lastReplicationAt, safeOffline: complete && s.state !== 'transferring', problem,
      readFailures: failures.length, lastReadFailure: failures[failures.length - 1]?.message ?? null,
      advisory: device.info.secretStorage === 'tpm' ? null : NO_TPM_ADVISORY,
    });
  }
  return out;
}

/** What `status` says on a laptop without a TPM (docs/security.md has the whole picture). */
export const NO_TPM_ADVISORY = 'no TPM: the device secret and agent key are files, and the clock and lock records can be rolled back by restoring older copies; offline policy is advisory against someone with root on this laptop';

/** Writes the desktop's current disk as a plaintext image (raw or qcow2) where the user asks. */
export async function exportDisk(env: ClientEnv, desktopRef: string, outPath: string, format: 'raw' | 'qcow2') {
  const device = await loadDevice(env.home);
  const vault = await Vault.open(env.home);
  const state = await vault.find(desktopRef);
  const { keys } = await vault.unlock(device, await env.password(), state);
  const opened = await openDesktopDisks(vault, state, keys);
  const disk = opened.disks[0]!;
  if (!disk.entry.complete) throw new CarryonError('wrong-state', `${state.name} is still being checked out: finish \`carryon checkout\` first`);
  // A plaintext copy leaves the vault's protection: only where the broker's policy allowed it at check-out.
  if (state.config.exportAllowed !== true) {
    await recordEvent(env.home, 'export-refused', state.desktopId, outPath);
    throw new CarryonError('export-denied', `exporting ${state.name} is not allowed by its policy (exportAllowed); ask an administrator`);
  }
  await convertChain(disk.chain, outPath, format);
  await recordEvent(env.home, 'export', state.desktopId, `${format} to ${outPath}`);
  return { path: outPath, format, bytes: disk.base.diskSize };
}

