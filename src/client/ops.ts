import { join } from 'node:path';
import { z } from 'zod';
import type { ChunkId } from '../core/chunk-id.js';
import { CarryonError } from '../core/errors.js';
import { decodeLineageKeys, type LineageKeys } from '../core/keys.js';
import { decodeManifest, diffManifests, encodeManifest, manifestDigest } from '../core/manifest.js';
import { exportImage } from '../import/export.js';
import { probeFingerprint } from '../net/pinned-agent.js';
import { downloadChunks, uploadChunks, type Progress } from '../transfer/client.js';
import type { RateLimiter } from '../transfer/rate-limit.js';
import { BrokerClient, BrokerError, CheckoutResponse, CheckoutView, DesktopEntry, JobView } from './broker-client.js';
import { chooseSecretStorage, createDeviceKeys, DeviceFile, type SecretStorage, hostFacts, loadDevice, type DeviceIdentity } from './home.js';
import { writeFileAtomic } from '../store/files.js';
import { Vault, type DesktopState } from './vault.js';

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

export async function enroll(env: ClientEnv, brokerUrl: string, opts: { fingerprint?: string; name: string; acceptFingerprint?: boolean; secretStorage?: SecretStorage | 'auto' }) {
  const u = new URL(brokerUrl);
  if (u.protocol !== 'https:') throw new CarryonError('invalid', 'the broker URL must be https://');
  const seen = await probeFingerprint(u.hostname, Number(u.port || 443));
  if (opts.fingerprint && opts.fingerprint.replace(/:/g, '').toLowerCase() !== seen) {
    throw new CarryonError('pin-mismatch', `the broker presents certificate ${seen}, not the expected ${opts.fingerprint}`);
  }
  if (!opts.fingerprint && !opts.acceptFingerprint) {
    throw new CarryonError('unpinned', `the broker's certificate fingerprint is ${seen}; compare it with what the server printed and re-run with --fingerprint ${seen}`);
  }
  const broker = new BrokerClient(u.origin, seen);
  try {
    const info = await broker.call('GET', '/v1/broker', undefined, z.object({ version: z.string(), signingPublicKey: z.string() }));
    const user = env.user ?? (() => { throw new CarryonError('invalid', 'enrolment needs --user'); })();
    await broker.login(user, await env.password());
    const { publicKeyB64, secretStorage } = await createDeviceKeys(env.home, chooseSecretStorage(opts.secretStorage ?? 'auto'));
    const host = await hostFacts(env.home);
    const { deviceId } = await broker.call('POST', '/v1/devices', { name: opts.name, publicKey: publicKeyB64, host: { os: host.os, cpus: host.cpus, ramBytes: host.ramBytes, freeDiskBytes: host.freeDiskBytes } }, z.object({ deviceId: z.string() }));
    const file: DeviceFile = { deviceId, name: opts.name, brokerUrl: u.origin, fingerprint: seen, signingPublicKey: info.signingPublicKey, secretStorage };
    await writeFileAtomic(join(env.home, 'device.json'), JSON.stringify(file, null, 2));
    env.log(`enrolled device ${deviceId} with ${u.origin} (certificate ${seen}; device secret ${secretStorage === 'tpm' ? 'sealed by this TPM' : 'in a 0600 file (no TPM found)'})`);
    return { deviceId, fingerprint: seen, host, secretStorage };
  } finally {
    await broker.close();
  }
}

/** An online session for `env.user` on this device (always a fresh password check). */
export async function onlineSession(env: ClientEnv): Promise<{ device: DeviceIdentity; broker: BrokerClient; user: string }> {
  const device = await loadDevice(env.home);
  const broker = new BrokerClient(device.info.brokerUrl, device.info.fingerprint);
  const user = env.user ?? (() => { throw new CarryonError('invalid', 'this needs --user (or CARRYON_USER)'); })();
  try {
    await broker.login(user, await env.password(), device.info.deviceId!);
  } catch (err) {
    await broker.close();
    throw err;
  }
  return { device, broker, user };
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

export async function checkout(env: ClientEnv, desktopRef: string) {
  const { device, broker, user } = await onlineSession(env);
  const vault = await Vault.open(env.home);
  let failed = false;
  try {
    const desktops = (await broker.call('GET', '/v1/desktops', undefined, z.object({ desktops: z.array(DesktopEntry) }))).desktops;
    const entry = desktops.find((d) => d.name === desktopRef || d.id === desktopRef);
    if (!entry) throw new CarryonError('not-found', `no desktop ${desktopRef} you are entitled to`);
    let state = (await vault.list()).find((s) => s.desktopId === entry.id);
    let keys: LineageKeys;
    if (state && state.state === 'transferring') {
      keys = await Vault.unwrapKeys(device, await env.password(), state);
      env.log(`resuming the check-out of ${entry.name}`);
    } else {
      if (state) throw new CarryonError('already-held', `${entry.name} is already checked out to this device`);
      const host = await hostFacts(env.home);
      const res = await broker.call('POST', `/v1/desktops/${entry.id}/checkout`, { deviceId: device.info.deviceId, host: { os: host.os, cpus: host.cpus, ramBytes: host.ramBytes, freeDiskBytes: host.freeDiskBytes } }, CheckoutResponse);
      keys = decodeLineageKeys(res.keys);
      for (const d of res.disks) {
        const m = decodeManifest(Buffer.from(d.manifest, 'base64'));
        if (manifestDigest(m) !== d.digest) throw new CarryonError('bad-manifest', `manifest of ${d.name} does not match its digest`);
        await vault.store.putManifest(d.digest, encodeManifest(m));
      }
      state = {
        desktopId: entry.id, name: entry.name, user, checkoutId: res.checkout.id, state: 'transferring', jobId: res.job.id,
        keys: await Vault.wrapKeys(device, await env.password(), keys, entry.id), lease: res.lease,
        config: res.config, localConfig: await vault.readLocalConfig(entry.id), disks: res.disks.map((d) => ({ name: d.name, baseDigest: d.digest })),
        lastReplicationAt: null, locked: false,
      };
      await vault.save(state);
      env.log(`checked out ${entry.name}: checkout ${res.checkout.id}, lease until ${res.checkout.leaseExpiresAt}`);
    }
    const job = await activeJob(env, broker, await broker.call('GET', `/v1/jobs/${state.jobId}`, undefined, JobView));
    const ids = new Set<ChunkId>();
    for (const d of state.disks) for (const id of (await vault.baseManifest(d.baseDigest)).chunks) if (id) ids.add(id);
    const result = await diskFullIsClear(env.home, () => downloadChunks({ endpoint: job.transfer!, ids: [...ids], localStore: vault.store, keys, signal: env.signal, rateLimit: env.rateLimit, renew: renewer(broker, job.id), onProgress: (p) => env.onProgress?.('check-out', p) }));
    await broker.call('POST', `/v1/checkouts/${state.checkoutId}/transferred`, {}, z.object({ checkout: CheckoutView }));
    await vault.save({ ...state, state: 'checked_out', jobId: null });
    env.log(`${entry.name} is local: ${result.chunksMoved} chunks (${result.bytesMoved} bytes) pulled; safe to go offline`);
    return { desktopId: entry.id, checkoutId: state.checkoutId, ...result };
  } catch (err) {
    failed = true;
    throw err;
  } finally {
    await broker.close();
    // Closing publishes pending blobs; when the transfer already failed (disk full), its error is the one to report.
    await vault.store.close().catch((err: unknown) => {
      if (!failed) throw err;
    });
  }
}

/** A full disk mid-transfer says so, and how to go on (what arrived is kept; the rerun resumes). */
async function diskFullIsClear<T>(home: string, fn: () => Promise<T>): Promise<T> {
  try {
    return await fn();
  } catch (err) {
    const code = (err as { code?: string }).code;
    if (code !== 'ENOSPC' && code !== 'SQLITE_FULL') throw err;
    const { freeDiskBytes } = await hostFacts(home).catch(() => ({ freeDiskBytes: 0 }));
    throw new CarryonError('disk-full', `the disk holding ${home} is full (${Math.floor(freeDiskBytes / 1024)} KiB free): free some space and run \`carryon checkout\` again; what arrived is kept`);
  }
}

/** Check-in or replicate: send only the chunks changed since the checkpoint, then commit. */
export async function upload(env: ClientEnv, desktopRef: string, kind: 'checkin' | 'replicate') {
  const { device, broker } = await onlineSession(env);
  const vault = await Vault.open(env.home);
  try {
    const state = await vault.find(desktopRef);
    if (state.state === 'transferring') throw new CarryonError('wrong-state', `${state.name} is still being checked out`);
    const keys = await Vault.unwrapKeys(device, await env.password(), state);
    const disks = await vault.openDisks(state, keys);
    const manifests = [];
    const changed = new Set<ChunkId>();
    // What each changed chunk replaced at its position: the base of a delta (only changed pages travel).
    const deltaBases = new Map<ChunkId, ChunkId>();
    for (const { name, disk } of disks) {
      await disk.flush();
      const m = disk.currentManifest();
      manifests.push({ name, manifest: m });
      for (const c of diffManifests(disk.baseManifest(), m)) {
        if (!c.to) continue;
        changed.add(c.to);
        if (c.from && !deltaBases.has(c.to)) deltaBases.set(c.to, c.from);
      }
    }
    let begin;
    try {
      begin = await broker.call('POST', `/v1/checkouts/${state.checkoutId}/${kind}`, { disks: manifests.map((d) => ({ name: d.name, manifest: encodeManifest(d.manifest).toString('base64') })) }, z.object({ job: JobView }));
    } catch (err) {
      // Killed after the broker committed but before the vault forgot the desktop: finish that.
      if (kind === 'checkin' && err instanceof BrokerError && err.code === 'wrong-state') {
        const desktops = (await broker.call('GET', '/v1/desktops', undefined, z.object({ desktops: z.array(DesktopEntry) }))).desktops;
        const now = desktops.find((d) => d.id === state.desktopId);
        if (!now?.checkout || now.checkout.id !== state.checkoutId) {
          for (const { disk } of disks) await disk.close();
          await vault.remove(state.desktopId);
          env.log(`${state.name} was already checked in; local state cleared`);
          return { snapshotId: now?.checkout?.snapshotId ?? 'unknown', changedChunks: 0, chunksSent: 0, bytesSent: 0 };
        }
      }
      throw err;
    }
    if (kind === 'checkin') await vault.save({ ...state, state: 'checking_in', jobId: begin.job.id });
    const job = await activeJob(env, broker, begin.job);
    const sent = await uploadChunks({ endpoint: job.transfer!, ids: [...changed], deltaBases, localStore: vault.store, keys, signal: env.signal, rateLimit: env.rateLimit, renew: renewer(broker, job.id), onProgress: (p) => env.onProgress?.(kind, p) });
    const commit = await broker.call('POST', `/v1/checkouts/${state.checkoutId}/${kind}/commit`, {}, z.object({ snapshotId: z.string(), checkout: CheckoutView }));
    if (kind === 'checkin') {
      for (const { disk } of disks) await disk.close();
      await vault.remove(state.desktopId);
      env.log(`checked in ${state.name}: ${changed.size} changed chunks, ${sent.chunksMoved} sent (${sent.bytesMoved} bytes); snapshot ${commit.snapshotId}`);
    } else {
      const next = { ...state, disks: [] as DesktopState['disks'], lastReplicationAt: new Date().toISOString() };
      for (const { name, disk } of disks) {
        const m = disk.currentManifest();
        await vault.store.putManifest(manifestDigest(m), encodeManifest(m));
        await disk.rebase(m);
        await disk.close();
        next.disks.push({ name, baseDigest: manifestDigest(m) });
      }
      await vault.save(next);
      env.log(`replicated ${state.name}: restore point ${commit.snapshotId}, ${sent.chunksMoved} chunks sent (${sent.bytesMoved} bytes)`);
    }
    return { snapshotId: commit.snapshotId, changedChunks: changed.size, chunksSent: sent.chunksMoved, bytesSent: sent.bytesMoved };
  } finally {
    await broker.close();
    await vault.store.close();
  }
}

/** Rollback (discard offline changes) or cancel (stop a check-out in flight): both unlock. */
export async function release(env: ClientEnv, desktopRef: string, how: 'rollback' | 'cancel') {
  const { broker } = await onlineSession(env);
  const vault = await Vault.open(env.home);
  try {
    const state = await vault.find(desktopRef);
    await broker.call('POST', `/v1/checkouts/${state.checkoutId}/${how}`, {}, z.object({ checkout: CheckoutView }));
    await vault.remove(state.desktopId);
    env.log(how === 'rollback' ? `rolled back ${state.name}: offline changes discarded, desktop unlocked` : `cancelled the check-out of ${state.name}`);
    return { desktopId: state.desktopId, state: how === 'rollback' ? 'rolled_back' : 'cancelled' };
  } finally {
    await broker.close();
    await vault.store.close();
  }
}

/** Offline-capable: opens the vault with the password and the lease, reports local state. */
export async function status(env: ClientEnv, desktopRef?: string) {
  const device = await loadDevice(env.home);
  const vault = await Vault.open(env.home);
  try {
    const states = desktopRef ? [await vault.find(desktopRef)] : await vault.list();
    const out = [];
    for (const s of states) {
      const { keys, lease } = await vault.unlock(device, await env.password(), s);
      const disks = await vault.openDisks(s, keys, undefined, { readOnly: true });
      let dirtyBytes = 0;
      let local = 0;
      for (const { disk } of disks) {
        dirtyBytes += disk.dirtyBytes();
        local += await disk.percentLocal();
        await disk.close();
      }
      const percentLocal = disks.length ? local / disks.length : 100;
      out.push({
        desktop: s.name, desktopId: s.desktopId, state: s.state, leaseDeadline: lease.deadline,
        leaseHoursLeft: Math.max(0, (Date.parse(lease.deadline) - Date.now()) / 3_600_000), dirtyBytes, percentLocal,
        lastReplicationAt: s.lastReplicationAt, safeOffline: percentLocal >= 100 && s.state !== 'transferring',
      });
    }
    return out;
  } finally {
    await vault.store.close();
  }
}

/** Runs `fn` on the desktop's disks (offline-capable); fetches missing chunks when online. */
export async function withDisks<T>(env: ClientEnv, desktopRef: string, fn: (disks: { name: string; disk: import('../disk/vault-disk.js').VaultDisk }[], state: DesktopState) => Promise<T>): Promise<T> {
  const device = await loadDevice(env.home);
  const vault = await Vault.open(env.home);
  try {
    const state = await vault.find(desktopRef);
    const { keys } = await vault.unlock(device, await env.password(), state);
    const disks = await vault.openDisks(state, keys);
    try {
      return await fn(disks, state);
    } finally {
      for (const { disk } of disks) await disk.close();
    }
  } finally {
    await vault.store.close();
  }
}

export async function exportDisk(env: ClientEnv, desktopRef: string, outPath: string, format: 'raw' | 'qcow2') {
  return withDisks(env, desktopRef, async (disks) => {
    const device = await loadDevice(env.home);
    const vault = await Vault.open(env.home);
    try {
      const state = await vault.find(desktopRef);
      const keys = await Vault.unwrapKeys(device, await env.password(), state);
      await exportImage(disks[0]!.disk.currentManifest(), { store: vault.store, keys }, outPath, { format });
      return { path: outPath, format, bytes: disks[0]!.disk.size };
    } finally {
      await vault.store.close();
    }
  });
}

