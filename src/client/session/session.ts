import { type KeyObject } from 'node:crypto';
import { join } from 'node:path';
import { z } from 'zod';
import { CarryonError } from '../../core/errors.js';
import { verifyLease } from '../../core/tokens/lease.js';
import { publicKeyFromBase64 } from '../../core/signing.js';
import type { Progress } from '../../transfer-client/client.js';
import type { RateLimiter } from '../../transfer-client/rate-limit.js';
import { writeFileAtomic } from '../../files/atomic.js';
import { BrokerClient, DesktopEntry, JobView } from '../../net/broker-client.js';
import { LEASE } from '../vault/guards.js';
import { brokerEndpoints, loadDevice, type DeviceIdentity } from '../vault/home.js';
import { resetClock } from '../vault/key-release.js';
import { Vault } from '../vault/vault.js';
import { fetchUnlockShare } from '../vault/online-unlock.js';

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

/**
 * The broker's lease-signing key, as the broker states it over the pinned TLS connection; it
 * must agree with the one pinned at enrolment. It is then pinned again inside each vault wrap.
 */
export async function pinnedBrokerKey(broker: BrokerClient, device: DeviceIdentity): Promise<KeyObject> {
  const info = await broker.call('GET', '/v1/broker', undefined, z.object({ signingPublicKey: z.string() }).loose());
  if (info.signingPublicKey !== device.info.signingPublicKey) throw new CarryonError('pin-mismatch', 'the broker\'s signing key differs from the one pinned at enrolment (device.json altered, or another broker): re-enrol');
  return publicKeyFromBase64(info.signingPublicKey);
}

/**
 * An online session for `env.user` on this device (always a fresh password check); `loaded`: the
 * device, read already; `unlock`: a check-out whose online unlock share the login's answer should bring.
 */
export async function onlineSession(env: ClientEnv, loaded?: DeviceIdentity, unlock?: string): Promise<{ device: DeviceIdentity; broker: BrokerClient; user: string }> {
  const device = loaded ?? await loadDevice(env.home);
  const broker = new BrokerClient(brokerEndpoints(device.info), '', env.log);
  const user = env.user ?? (() => { throw new CarryonError('invalid', 'this needs --user (or CARRYON_USER)'); })();
  try {
    await broker.login(user, await env.password(), device.info.deviceId!, unlock);
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
      // The broker just checked the password: its share opens each vault without the KDF (online-unlock.ts).
      const share = await fetchUnlockShare(broker, s, env.log).catch(() => null);
      const { keys, state } = await vault.openKeys(device, password, s, { unlockShare: share });
      let issuedAt: string;
      try {
        issuedAt = verifyLease(lease, keys.brokerKey, { now: new Date(), deviceId: device.info.deviceId!, desktopId: s.desktopId }).issuedAt;
      } catch (err) {
        if ((err as CarryonError).code === 'lease-not-covered') continue;
        throw err;
      }
      await writeFileAtomic(join(vault.desktopDir(s.desktopId), LEASE), JSON.stringify(lease));
      await resetClock(vault, state, keys, issuedAt, device);
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
export async function activeJob(env: ClientEnv, broker: BrokerClient, job: JobView): Promise<JobView> {
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

export function renewer(broker: BrokerClient, jobId: string) {
  return async () => {
    const j = await broker.call('GET', `/v1/jobs/${jobId}`, undefined, JobView);
    if (!j.transfer) throw new CarryonError('job-ended', `job ${jobId} is ${j.state}`);
    return j.transfer;
  };
}

/** Looks up the desktop on the broker (by name or id) among those the user may use. */
export async function findEntry(broker: BrokerClient, ref: string) {
  const desktops = (await broker.call('GET', '/v1/desktops', undefined, z.object({ desktops: z.array(DesktopEntry) }))).desktops;
  const entry = desktops.find((d) => d.name === ref || d.id === ref);
  if (!entry) throw new CarryonError('not-found', `no desktop ${ref} you are entitled to`);
  return entry;
}
