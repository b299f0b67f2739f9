import { join } from 'node:path';
import { CarryonError } from '../../core/errors.js';
import { ControlClient } from '../../live/control.js';
import { NbdClient } from '../../nbd/client.js';
import type { BrokerClient } from '../../net/broker-client.js';
import { changedManifests, type DiskReader } from '../../live/disks/changes.js';
import { sendChanges } from './send-changes.js';
import { chainOf, socketDir, type DesktopDisk } from '../../live/disks/disks.js';
import { FrozenLayers } from '../../live/frozen-layers.js';
import type { FrozenPoint } from '../../live/live-chain.js';
import { controlKey, liveSocketPath } from '../../live/live-holder.js';
import type { DesktopKeys } from '../../live/disks/desktop-keys.js';
import type { ClientEnv } from '../session/session.js';
import type { DesktopState, Vault } from '../vault/vault.js';
import { traced } from '../../files/trace.js';

/**
 * A replica of a desktop another process holds and runs: that process freezes a point in time
 * (milliseconds of paused guest I/O), this one reads the frozen pages (from its own storage daemon:
 * frozen-layers.ts; from the holder's NBD export where that cannot open) and sends them as any
 * replica, then tells the holder to fold them into the base. Whatever fails before the broker's
 * acknowledgement, the frozen layer goes back into the top (abandon): nothing is lost.
 */
export async function liveReplicate(o: { env: ClientEnv; broker: BrokerClient; vault: Vault; state: DesktopState; keys: DesktopKeys; background?: boolean }) {
  const { env, broker, vault, state, keys } = o;
  if (state.damaged) throw new CarryonError('base-damaged', `${state.name} is marked damaged since ${state.damaged.at}: ${state.damaged.message}`);
  const control = await traced('live-connect', async () => ControlClient.connect(await liveSocketPath({ vault, state }), controlKey(keys, state.desktopId)));
  const clients: NbdClient[] = [];
  let frozen: FrozenLayers | null = null;
  const closeReaders = async () => {
    for (const c of clients.splice(0)) await c.close().catch(() => undefined);
    await frozen?.close().catch((err: unknown) => env.log(`the replica's reader did not stop cleanly: ${(err as Error).message}`));
    frozen = null;
  };
  // A user's check-in or replica asks a background one to give way (control.ts): it stops sending and puts its point back.
  const gaveWay = new AbortController();
  control.onGiveWay(() => gaveWay.abort());
  const signal = env.signal ? AbortSignal.any([env.signal, gaveWay.signal]) : gaveWay.signal;
  try {
    // A user's freeze normally answers in milliseconds; longer, an earlier replica is giving way or folding (control.ts, live-chain.ts): say so.
    const waiting = o.background ? null : setTimeout(() => env.log(`waiting for ${state.name}'s earlier replica (the agent's: it gives way, or its fold finishes at full speed)…`), 1500);
    const point = await traced('live-freeze', () => control.freeze({ background: o.background === true })).finally(() => waiting && clearTimeout(waiting));
    env.log(`replicating ${state.name} while it runs: point in time taken (${point.kind === 'quiesced' ? 'file systems quiesced by the guest agent' : `crash-consistent${point.reason ? `: ${point.reason}` : ''}`}; guest I/O paused ${point.pausedMs.toFixed(1)} ms)`);
    let outcome;
    let disks: DesktopDisk[];
    try {
      const readers: DiskReader[] = [];
      frozen = await traced('live-open-frozen', () => openFrozen(env, vault, state, keys, point));
      for (const d of point.disks) {
        const entry = state.disks.find((x) => x.name === d.name);
        if (!entry) throw new CarryonError('bad-state', `the running desktop has a disk ${d.name} that the vault does not know`);
        const disk: DesktopDisk = { name: d.name, chain: chainOf(vault, state, keys, d.name), base: await traced('live-base-manifest', () => vault.manifest(state.desktopId, d.baseDigest)), entry };
        const top = frozen ? await NbdClient.connect(frozen.socketPath, frozen.exportName(d.name)) : await NbdClient.connect(point.socketPath, d.exportName);
        clients.push(top);
        readers.push({ disk, top, extents: d.extents });
      }
      disks = readers.map((r) => r.disk);
      outcome = await sendChanges({ env: { ...env, signal }, broker, vault, state, keys, kind: 'replicate', readers, background: o.background === true });
    } catch (err) {
      // Our reader closes before the holder takes the top back down into the frozen layer.
      await closeReaders();
      await control.abandon(point.id).catch(() => undefined);
      if (gaveWay.signal.aborted && !env.signal?.aborted) throw new CarryonError('replica-gave-way', `the background replica of ${state.name} gave way to a check-in or replica asked for meanwhile: nothing is lost, the next replica sends these changes`);
      throw err;
    }
    // Closed before the fold: nothing of ours has the frozen layer open while the holder commits it.
    await traced('live-close-readers', closeReaders);
    // Acknowledged: the frozen pages are the restore point; the holder folds them into the base.
    const digests = new Map<string, string>();
    await traced('live-put-manifests', async () => {
      for (const m of changedManifests(disks, outcome.changes.changes)) digests.set(m.name, await vault.putManifest(state.desktopId, m.manifest));
    });
    // A background replica's fold yields to the guest's I/O; a check-in's bulk folds at full speed.
    await traced('live-fold', () => control.fold(point.id, digests, { background: o.background === true }));
    return { ...outcome, kind: point.kind, pausedMs: point.pausedMs };
  } finally {
    await closeReaders();
    control.close();
  }
}

/**
 * The frozen layers opened by this process, as the vault names them now (the holder recorded each
 * disk's frozen layer, `under`, before it froze). Null, with a line in the log, where they cannot be
 * opened here: the holder's own export serves the replica then, as before.
 */
async function openFrozen(env: ClientEnv, vault: Vault, before: DesktopState, keys: DesktopKeys, point: FrozenPoint): Promise<FrozenLayers | null> {
  try {
    const now = await vault.find(before.desktopId);
    const layers = point.disks.map((d) => ({ name: d.name, chain: chainOf(vault, now, keys, d.name, 'under') }));
    return await FrozenLayers.open(join(await socketDir(vault, before.desktopId), `replica-${process.pid}`), layers);
  } catch (err) {
    env.log(`reading the frozen pages through the holder (${(err as Error).message})`);
    return null;
  }
}
