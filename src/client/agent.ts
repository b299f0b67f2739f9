import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { z } from 'zod';
import { SignedLease, verifyLease } from '../core/lease.js';
import { decodeManifest } from '../core/manifest.js';
import { publicKeyFromBase64 } from '../core/signing.js';
import { BrokerClient } from './broker-client.js';
import { hostFacts, loadDevice, type DeviceIdentity } from './home.js';
import { upload, type ClientEnv } from './ops.js';
import { Vault, type DesktopState } from './vault.js';

const HeartbeatReply = z.object({
  heartbeatIntervalSec: z.number().int().min(1),
  policies: z.record(z.string(), z.record(z.string(), z.unknown())),
  commands: z.array(z.object({ id: z.string(), type: z.enum(['lock', 'unlock', 'wipe', 'replicate', 'renew-lease']), desktopId: z.string().optional() })),
});

/** Dirty bytes and percent local without the user's keys: from the persisted dirty set and chunk IDs. */
async function diskStats(vault: Vault, s: DesktopState): Promise<{ dirtyBytes: number; percentLocal: number }> {
  let dirtyBytes = 0;
  let present = 0;
  let total = 0;
  for (const d of s.disks) {
    const base = await vault.baseManifest(d.baseDigest);
    let current = base;
    try {
      const saved = JSON.parse(await readFile(join(vault.desktopDir(s.desktopId), 'disks', d.name, 'disk-state.json'), 'utf8')) as { current: string; dirty: number[] };
      current = decodeManifest(Buffer.from(saved.current, 'base64'));
      dirtyBytes += saved.dirty.length * current.chunkSize;
    } catch { /* never written */ }
    const ids = [...new Set(current.chunks.filter((c): c is string => c !== null))];
    total += ids.length;
    present += ids.length - (await vault.store.missing(ids)).length;
  }
  return { dirtyBytes, percentLocal: total ? (100 * present) / total : 100 };
}

async function oneRound(env: ClientEnv, device: DeviceIdentity, vault: Vault, broker: BrokerClient): Promise<{ intervalSec: number; commands: number; online: boolean }> {
  const me = { id: device.info.deviceId!, key: device.privateKey };
  const states = await vault.list();
  const host = await hostFacts(env.home);
  const desktops = [];
  for (const s of states) desktops.push({ desktopId: s.desktopId, checkoutId: s.checkoutId, state: s.locked ? 'locked' : s.state, ...(await diskStats(vault, s)), lastReplicationAt: s.lastReplicationAt ?? undefined });
  let reply: z.infer<typeof HeartbeatReply>;
  try {
    reply = await broker.signedPost('/v1/agent/heartbeat', { host, vaultBytes: await vault.sizeBytes(), desktops }, me, HeartbeatReply);
  } catch (err) {
    // No contact: a lease that has run out locks its desktop until the broker is reachable again.
    const now = await vault.trustedNow();
    for (const s of states) {
      try {
        verifyLease(s.lease, publicKeyFromBase64(device.info.signingPublicKey), { now, deviceId: me.id, desktopId: s.desktopId });
      } catch {
        if (!s.locked) {
          await vault.save({ ...s, locked: true });
          env.log(`${s.name}: lease expired without contact; desktop locked`);
        }
      }
    }
    env.log(`broker unreachable: ${(err as Error).message}`);
    return { intervalSec: 60, commands: 0, online: false };
  }
  let ran = 0;
  for (const c of reply.commands) {
    const s = states.find((x) => x.desktopId === c.desktopId) ?? (c.type === 'renew-lease' ? states[0] : undefined);
    let ok = true;
    let message = '';
    try {
      if (!s && c.type !== 'renew-lease') throw new Error(`desktop ${c.desktopId ?? '(none)'} is not on this device`);
      if (c.type === 'lock' || c.type === 'unlock') await vault.save({ ...s!, locked: c.type === 'lock' });
      else if (c.type === 'wipe') await vault.remove(s!.desktopId); // keys gone: its blobs can no longer be read
      else if (c.type === 'renew-lease') await renewLeases(vault, broker, me, device);
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
  await renewLeases(vault, broker, me, device);
  // Scheduled replication, when policy asks for it and the user's password is available to the agent.
  for (const s of await vault.list()) {
    const interval = Number(reply.policies[s.desktopId]?.replicationIntervalMin ?? 0);
    const due = interval > 0 && (!s.lastReplicationAt || Date.now() - Date.parse(s.lastReplicationAt) > interval * 60_000);
    if (due && s.state === 'checked_out' && !s.locked) {
      try {
        await upload(env, s.desktopId, 'replicate');
      } catch (err) {
        env.log(`scheduled replication of ${s.name} failed: ${(err as Error).message}`);
      }
    }
  }
  return { intervalSec: reply.heartbeatIntervalSec, commands: ran, online: true };
}

async function renewLeases(vault: Vault, broker: BrokerClient, me: { id: string; key: DeviceIdentity['privateKey'] }, device: DeviceIdentity): Promise<void> {
  const states = await vault.list();
  if (states.length === 0) return;
  const { lease } = await broker.signedPost('/v1/agent/lease', {}, me, z.object({ lease: SignedLease.nullable() }));
  if (!lease) return;
  const payload = verifyLease(lease, publicKeyFromBase64(device.info.signingPublicKey), { now: new Date(), deviceId: me.id });
  for (const s of states) if (payload.desktops.includes(s.desktopId)) await vault.save({ ...s, lease });
}

/** The agent loop: outbound HTTPS only; it never opens a listening socket. */
export async function runAgent(env: ClientEnv, opts: { once: boolean; signal?: AbortSignal }) {
  const device = await loadDevice(env.home);
  const broker = new BrokerClient(device.info.brokerUrl, device.info.fingerprint);
  try {
    for (;;) {
      const vault = await Vault.open(env.home);
      let res;
      try {
        res = await oneRound(env, device, vault, broker);
      } finally {
        await vault.store.close();
      }
      if (opts.once || opts.signal?.aborted) return res;
      await new Promise<void>((resolve) => {
        const t = setTimeout(resolve, res.intervalSec * 1000);
        opts.signal?.addEventListener('abort', () => { clearTimeout(t); resolve(); }, { once: true });
      });
      if (opts.signal?.aborted) return res;
    }
  } finally {
    await broker.close();
  }
}
