import { createPublicKey } from 'node:crypto';
import { join } from 'node:path';
import { z } from 'zod';
import { writeFileAtomic } from '../files/atomic.js';
import { SignedLease, verifyLease } from '../core/tokens/lease.js';
import { readDiskFailures, topBytes } from '../live/disks/disks.js';
import { percentLocal } from '../live/fill/local-progress.js';
import { pendingEvents, recordEvent } from '../live/disks/events.js';
import { stopReasonWords, writeStopReason, type StopReason } from './devices/stop-reason.js';
import { effectiveConfig, LEASE, lockDesktop, peekClock, writeLockRecord, writePolicy } from './vault/guards.js';
import { readOwner } from '../live/fill/holder.js';
import { publicKeyFromBase64 } from '../core/signing.js';
import { BrokerClient } from '../net/broker-client.js';
import { brokerEndpoints, hostFacts, loadDevice, type DeviceIdentity } from './vault/home.js';
import { upload, type ClientEnv } from './ops.js';
import { BackgroundReplicas, replicateInBackground } from './background.js';
import { Vault, type DesktopState } from './vault/vault.js';
import { AgentClockWriter } from './vault/agent-clock.js';
import { laptopClock } from './vault/laptop-clock.js';
import { eraseAllParked, eraseParked } from './vault/parked.js';
import { existsSync } from 'node:fs';
import { PACKAGE_VERSION } from '../core/version.js';
import { readReleasePin } from './vault/release-pin.js';
import { applyUpdate, installRootOf, runningPackageDir, UpdateOffer, writeLauncher, type UpdateState } from './update.js';
import { rulesFromPolicy } from '../devices/usb-rules.js';
import { hardwareFacts } from '../devices/hardware.js';
import { probeVirgl } from '../hypervisor/host.js';
import { usbTestSeams } from '../devices/usb-host.js';

/** Where updates install (a managed install's root), and how long a new version's self-check may take. */
export interface AgentUpdateOptions { installRoot?: string | null; selfCheckMs?: number }

const HeartbeatReply = z.object({
  heartbeatIntervalSec: z.number().int().min(1),
  policies: z.record(z.string(), z.record(z.string(), z.unknown())),
  commands: z.array(z.object({ id: z.string(), type: z.enum(['lock', 'unlock', 'wipe', 'replicate', 'renew-lease']), desktopId: z.string().optional() })),
  /** Set when an administrator revoked this device (older brokers leave it out). */
  deviceRevoked: z.boolean().optional(),
  /** A newer client release rolled out to this device's ring (client/update.ts verifies it). */
  update: UpdateOffer.optional(),
});

/** Dirty bytes and percent local without the user's keys: the top layers' size and the fill state. */
async function diskStats(vault: Vault, s: DesktopState): Promise<{ dirtyBytes: number; percentLocal: number; readFailures: number }> {
  // Failures a reader saw offline (a chunk that failed authentication, a link that gave up) reach the broker here.
  const readFailures = (await readDiskFailures(vault, s.desktopId)).length;
  return { dirtyBytes: await topBytes(vault, s), percentLocal: await percentLocal(vault, s), readFailures };
}

/** Stops the process holding the desktop's disk (a running VM shuts down; a transfer pauses). */
async function stopOwner(vault: Vault, s: DesktopState, log: (l: string) => void, reason: StopReason, home: string): Promise<void> {
  const owner = await readOwner(vault, s.desktopId);
  if (!owner) return;
  log(`${s.name}: stopping \`carryon ${owner.kind}\` (pid ${owner.pid}): ${stopReasonWords(reason)}`);
  // `run` reads why before it shuts its guest down (ACPI first, forced after its bound) and says so.
  await writeStopReason(vault, s.desktopId, reason);
  await recordEvent(home, 'guest-stop', s.desktopId, `${stopReasonWords(reason)}: stopping \`carryon ${owner.kind}\` (pid ${owner.pid})`);
  try {
    process.kill(owner.pid, 'SIGTERM');
  } catch {
    return;
  }
  for (let i = 0; i < 900; i++) {
    await new Promise((r) => setTimeout(r, 100));
    try {
      process.kill(owner.pid, 0);
    } catch {
      return;
    }
  }
  try {
    process.kill(owner.pid, 'SIGKILL');
  } catch { /* gone */ }
}

let glProbe: Promise<boolean | null> | null = null;
/** virgl probed once per agent process (it starts QEMU for a second); null where there is no window system to use it. */
function glOnce(): Promise<boolean | null> {
  if (!process.env.DISPLAY && !process.env.WAYLAND_DISPLAY) return Promise.resolve(null);
  return (glProbe ??= probeVirgl().then((r) => r.ok, () => null));
}

async function oneRound(env: ClientEnv, device: DeviceIdentity, vault: Vault, broker: BrokerClient, clock: AgentClockWriter, updates: AgentUpdateOptions, replicas: BackgroundReplicas): Promise<{ intervalSec: number; commands: number; online: boolean; update?: UpdateState | 'skipped' }> {
  const me = { id: device.info.deviceId!, key: device.privateKey };
  // First, with or without the broker: time this laptop has reached is on record before anything else.
  const recorded = await clock.advance();
  const states = await vault.list();
  // Display and USB facts for the admin (what this laptop can offer a desktop); GL probed once per agent.
  const host = { ...(await hostFacts(env.home)), ...(await hardwareFacts({ usbRoot: usbTestSeams().sysfs, gl: await glOnce() }).catch(() => ({}))) };
  const desktops = [];
  for (const s of states) desktops.push({ desktopId: s.desktopId, checkoutId: s.checkoutId, state: (await vault.isLocked(s)) ? 'locked' : s.state, ...(await diskStats(vault, s)), lastReplicationAt: s.lastReplicationAt ?? undefined });
  let reply: z.infer<typeof HeartbeatReply>;
  try {
    const offline = await pendingEvents(env.home);
    reply = await broker.signedPost('/v1/agent/heartbeat', { host, vaultBytes: await vault.sizeBytes(), desktops, ...(offline.events.length ? { events: offline.events } : {}), client: { version: PACKAGE_VERSION } }, me, HeartbeatReply);
    await offline.sent();
  } catch (err) {
    // No contact: a lease that has run out locks its desktop until a renewed lease reaches it.
    // The agent has no vault key, so it reads time and lease unauthenticated: that can only lock sooner.
    // Its own record counts too: a system clock set back while it runs does not delay the lock.
    for (const s of states) {
      const dir = vault.desktopDir(s.desktopId);
      const now = new Date(Math.max(laptopClock.now(), await peekClock(dir), recorded ?? 0));
      const lease = await vault.storedLease(s);
      try {
        verifyLease(lease, publicKeyFromBase64(device.info.signingPublicKey), { now, deviceId: me.id, desktopId: s.desktopId });
      } catch {
        if (!(await vault.isLocked(s))) {
          await replicas.stop(s.desktopId);
          await lockDesktop(dir, device.privateKey, { desktopId: s.desktopId, reason: 'expiry', at: new Date().toISOString(), leaseIssuedAt: leaseIssuedAt(lease) });
          await stopOwner(vault, s, env.log, 'lease-expired', env.home);
          env.log(`${s.name}: lease expired without contact; desktop locked`);
        }
      }
    }
    env.log(`broker unreachable: ${(err as Error).message}`);
    return { intervalSec: 60, commands: 0, online: false };
  }
  let ran = 0;
  // A revoked device keeps no parked copy: nothing may ever open them again here.
  if (reply.deviceRevoked) {
    const n = await eraseAllParked(env.home);
    if (n) env.log(`this device was revoked: ${n} parked cop${n === 1 ? 'y' : 'ies'} erased`);
  }
  for (const c of reply.commands) {
    const s = states.find((x) => x.desktopId === c.desktopId) ?? (c.type === 'renew-lease' ? states[0] : undefined);
    let ok = true;
    let message = '';
    try {
      // The agent's own replica of that desktop steps aside first (a lock or wipe never waits on it).
      if (c.desktopId) await replicas.stop(c.desktopId);
      // A wipe reaches parked copies too (kept after a check-in: client/parked.ts), held or not.
      const parkedGone = c.type === 'wipe' && c.desktopId ? await eraseParked(env.home, c.desktopId) : false;
      if (!s && parkedGone) {
        await broker.signedPost(`/v1/agent/commands/${c.id}/ack`, { ok: true, message: 'wipe done (parked copy erased)' }, me, z.object({ ok: z.boolean() }));
        env.log('command wipe: ok (parked copy erased)');
        ran++;
        continue;
      }
      if (!s && c.type !== 'renew-lease') throw new Error(`desktop ${c.desktopId ?? '(none)'} is not on this device`);
      const dir = s ? vault.desktopDir(s.desktopId) : '';
      if (c.type === 'lock') {
        await lockDesktop(dir, device.privateKey, { desktopId: s!.desktopId, reason: 'admin', at: new Date().toISOString(), leaseIssuedAt: null });
        await stopOwner(vault, s!, env.log, 'locked', env.home); // a running desktop stops now, not at its next start
      } else if (c.type === 'unlock') {
        // The next open with the password makes a new unlock token (the agent cannot).
        if (await vault.isLocked(s!)) await writeLockRecord(dir, device.privateKey, { desktopId: s!.desktopId, reason: 'admin-unlocked', at: new Date().toISOString(), leaseIssuedAt: null });
      } else if (c.type === 'wipe') {
        await stopOwner(vault, s!, env.log, 'wiped', env.home);
        await vault.wipe(s!.desktopId); // crypto-erase: wrapped keys and LUKS headers overwritten, then removed
      }
      else if (c.type === 'renew-lease') await renewLeases(vault, broker, me, device, clock);
      else if (c.type === 'replicate') await upload(env, s!.desktopId, 'replicate');
      message = `${c.type} done`;
    } catch (err) {
      ok = false;
      message = (err as Error).message;
    }
    await broker.signedPost(`/v1/agent/commands/${c.id}/ack`, { ok, message }, me, z.object({ ok: z.boolean() }));
    env.log(`command ${c.type}: ${ok ? 'ok' : `failed: ${message}`}`);
    ran++;
  }
  await renewLeases(vault, broker, me, device, clock);
  // Policy reaches the desktop at once: the offline config follows the broker's USB policy
  // (restrict-only: what the agent writes can take USB away, never grant it beyond the check-out's
  // config). A running desktop's holder watches this file and detaches what no longer passes.
  for (const s of await vault.list()) {
    const p = reply.policies[s.desktopId];
    if (typeof p?.usbAllowed !== 'boolean') continue;
    const dir = vault.desktopDir(s.desktopId);
    const before = (await effectiveConfig(dir, s.config)).usb;
    // Rules this agent cannot read: no device passes, rather than any.
    const rules = (() => {
      try {
        return rulesFromPolicy(p);
      } catch {
        return null;
      }
    })();
    await writePolicy(dir, rules ? { usbAllowed: rules.allowed, usb: { classes: rules.classes, allow: rules.allow, deny: rules.deny, storage: rules.storage }, printingAllowed: rules.printers } : { usbAllowed: false, printingAllowed: false });
    const after = (await effectiveConfig(dir, s.config)).usb;
    if (before !== after) env.log(`${s.name}: USB ${after ? 'allowed' : 'no longer allowed'}`);
  }
  // Scheduled replication, when policy asks for it and the user's password is available to the agent.
  for (const s of await vault.list()) {
    const interval = Number(reply.policies[s.desktopId]?.replicationIntervalMin ?? 0);
    const due = interval > 0 && (!s.lastReplicationAt || Date.now() - Date.parse(s.lastReplicationAt) > interval * 60_000);
    if (due && s.state === 'checked_out' && !(await vault.isLocked(s))) {
      // A running desktop (run, serve) is replicated live by the process that holds it; a check-out
      // or check-in in flight is left alone and the replica tried at the next heartbeat.
      const owner = await readOwner(vault, s.desktopId);
      if (owner && owner.kind !== 'run' && owner.kind !== 'serve') {
        env.log(`scheduled replication of ${s.name} deferred: \`carryon ${owner.kind}\` is working on it`);
        continue;
      }
      // At low priority, in a process of its own: the desktop in use keeps the laptop's CPU. Not
      // awaited: the next heartbeat (a lock, a wipe) does not wait for it.
      if (!replicas.start(s.desktopId, s.name, (stop) => replicateInBackground({ ...env, signal: env.signal ? AbortSignal.any([env.signal, stop]) : stop }, s.desktopId))) {
        env.log(`scheduled replication of ${s.name}: the previous one is still running`);
      }
    }
  }
  // Last, after commands and replicas: an update never delays a lock or a wipe.
  const update = reply.update ? await offerUpdate(env, device, broker, reply.update, updates) : undefined;
  return { intervalSec: reply.heartbeatIntervalSec, commands: ran, online: true, ...(update ? { update } : {}) };
}

async function offerUpdate(env: ClientEnv, device: DeviceIdentity, broker: BrokerClient, offer: UpdateOffer, opts: AgentUpdateOptions): Promise<UpdateState | 'skipped'> {
  const packageDir = runningPackageDir();
  const root = opts.installRoot === undefined ? installRootOf(packageDir) : opts.installRoot;
  if (!root) {
    env.log(`update ${offer.version} offered, but this Carryon (${packageDir}) is not a managed install (<root>/versions/<version>/package): not updated`);
    return 'skipped';
  }
  const me = { id: device.info.deviceId!, key: device.privateKey };
  return applyUpdate({ root, home: env.home, pinned: () => readReleasePin(env.home, me), running: { version: PACKAGE_VERSION, packageDir }, broker, device: me, log: env.log, selfCheckMs: opts.selfCheckMs }, offer);
}

async function renewLeases(vault: Vault, broker: BrokerClient, me: { id: string; key: DeviceIdentity['privateKey'] }, device: DeviceIdentity, clock: AgentClockWriter): Promise<void> {
  const states = await vault.list();
  if (states.length === 0) return;
  const { lease } = await broker.signedPost('/v1/agent/lease', {}, me, z.object({ lease: SignedLease.nullable() }));
  if (!lease) return;
  const payload = verifyLease(lease, publicKeyFromBase64(device.info.signingPublicKey), { now: new Date(), deviceId: me.id });
  // Broker time, signed: the one source that may start the device clock record over (agent-clock.ts).
  await clock.anchor(payload.issuedAt);
  // Broker-signed, so it needs no MAC: the vault verifies it against the pinned key before use.
  for (const s of states) if (payload.desktops.includes(s.desktopId)) await writeFileAtomic(join(vault.desktopDir(s.desktopId), LEASE), JSON.stringify(lease));
}

function leaseIssuedAt(lease: SignedLease): string | null {
  try {
    const p = JSON.parse(Buffer.from(lease.payload, 'base64').toString('utf8')) as { issuedAt?: unknown };
    return typeof p.issuedAt === 'string' ? p.issuedAt : null;
  } catch {
    return null;
  }
}

/** The agent loop: outbound HTTPS only; it never opens a listening socket. */
export async function runAgent(env: ClientEnv, opts: { once: boolean; signal?: AbortSignal } & AgentUpdateOptions) {
  const device = await loadDevice(env.home);
  const broker = new BrokerClient(brokerEndpoints(device.info), '', env.log);
  // A managed install gets its launcher before any update needs it (the service runs that).
  const root = opts.installRoot === undefined ? installRootOf(runningPackageDir()) : opts.installRoot;
  if (root && !existsSync(join(root, 'bin', 'carryon'))) await writeLauncher(root);
  const clock = new AgentClockWriter(env.home, { key: device.privateKey, pub: createPublicKey(device.privateKey), id: device.info.deviceId! }, env.log);
  const replicas = new BackgroundReplicas(env.log);
  try {
    for (;;) {
      const vault = await Vault.open(env.home);
      let res;
      res = await oneRound(env, device, vault, broker, clock, opts, replicas);
      // Updated: this process still runs the old code; it ends so that its service starts the launcher (the new version) again.
      if (opts.once || opts.signal?.aborted || res.update === 'done') return res;
      await new Promise<void>((resolve) => {
        const t = setTimeout(resolve, res.intervalSec * 1000);
        opts.signal?.addEventListener('abort', () => { clearTimeout(t); resolve(); }, { once: true });
      });
      if (opts.signal?.aborted) return res;
    }
  } finally {
    // `--once` returns when its replicas have (their outcome is that run's); a long-running agent
    // that ends (stopped, or restarting into an update) stops them: their points go back, nothing lost.
    if (opts.once) await replicas.drain();
    else await replicas.stopAll();
    await broker.close();
  }
}
