import { join } from 'node:path';
import { CarryonError } from '../../core/errors.js';
import { chainFiles, layerSecret, topExtents } from '../../disk/chain.js';
import { presentRanges } from '../../disk/qcow2/qcow2-map.js';
import { measureLayer } from '../../disk/layer-shape.js';
import { ReadAhead } from '../../files/stamped.js';
import { Qcow2Reader } from '../../disk/qcow2/qcow2-reader.js';
import { UnsupportedImage } from '../../disk/qcow2/qcow2-format.js';
import type { Range } from '../../core/chunks/delta.js';
import { addChain, StorageDaemon } from '../../disk/storage-daemon.js';
import { NbdClient } from '../../nbd/client.js';
import { changedManifests, type DiskReader } from '../../live/disks/changes.js';
import { loadDevice, type DeviceIdentity } from '../vault/home.js';
import { keepsLocalCopy, parkBases, parkedFrom, stampParked, unlinkVaultBases } from '../vault/parked.js';
import type { DiskChanges } from '../../live/disks/changes.js';
import { guardUpload } from '../../live/disks/layer-guard.js';
import { chainOf, diskDir, socketDir, type DesktopDisk } from '../../live/disks/disks.js';
import { openDesktopDisks } from '../../live/disks/open.js';
import { claimOwner, diskPrefix, readOwner, specFor } from '../../live/fill/holder.js';
import { liveReplicate } from './live-upload.js';
import { controlKey, liveSocketPath } from '../../live/live-holder.js';
import { ControlClient } from '../../live/control.js';
import type { DesktopKeys } from '../../live/disks/desktop-keys.js';
import type { WrapKey } from '../vault/kdf.js';
import { findEntry, onlineSession, type ClientEnv } from '../session/session.js';
import { sendChanges, type UploadKind } from './send-changes.js';
import { Vault, type DesktopState } from '../vault/vault.js';
import { fetchUnlockShare } from '../vault/online-unlock.js';
import { traced } from '../../files/trace.js';

export type { UploadKind };

/**
 * The change since the checkpoint, per disk: the top layer's extents and the bytes it holds.
 * The stopped tops are read from Node (Qcow2Reader.openTop: no process to start, OpenSSL's XTS);
 * a top that reader does not know goes through a storage daemon, read-only. The caller holds
 * the desktop's owner claim, so no run or serve writes the chain meanwhile.
 */
async function withReaders<T>(vault: Vault, state: DesktopState, disks: DesktopDisk[], ahead: ReadAhead | undefined, opening: Promise<OpenedTops | null> | null, fn: (readers: DiskReader[]) => Promise<T>): Promise<T> {
  const maps = disks.map((d) => traced('map-read', () => topExtents(d.chain, ahead)));
  for (const m of maps) m.catch(() => undefined);
  const want = disks.map((d) => ({ path: d.chain.files.top, secret: layerSecret(d.chain, 'top') }));
  // Opened ahead (the key slots only) if those were these files; else opened now.
  let opened = opening ? await opening.catch(() => null) : null;
  if (opened && opened.paths.join('\0') !== want.map((w) => w.path).join('\0')) {
    await Promise.all(opened.readers.map((r) => r.close()));
    opened = null;
  }
  opened ??= await traced('open-tops', () => openTops(want));
  if (!opened) return withDaemonReaders(vault, state, disks, maps, fn);
  const tops = opened.readers;
  try {
    const readers: DiskReader[] = [];
    for (const [i, d] of disks.entries()) readers.push({ disk: d, top: tops[i]!, extents: await maps[i]! });
    return await fn(readers);
  } finally {
    await Promise.all(tops.map((t) => t.close()));
  }
}

interface OpenedTops {
  paths: string[];
  readers: Qcow2Reader[];
}

/** Readers of the tops (their key slots opened, no data read), or null where one is an image Qcow2Reader does not know. */
async function openTops(tops: { path: string; secret: string }[]): Promise<OpenedTops | null> {
  const readers: Qcow2Reader[] = [];
  try {
    for (const t of tops) readers.push(await Qcow2Reader.openTop(t.path, t.secret));
    return { paths: tops.map((t) => t.path), readers };
  } catch (err) {
    await Promise.all(readers.map((r) => r.close()));
    if (err instanceof UnsupportedImage) return null;
    throw err;
  }
}

/** The same through qemu-storage-daemon (an image Qcow2Reader refuses): refused while a QEMU holds the disk. */
async function withDaemonReaders<T>(vault: Vault, state: DesktopState, disks: DesktopDisk[], maps: Promise<Range[]>[], fn: (readers: DiskReader[]) => Promise<T>): Promise<T> {
  const dir = await socketDir(vault, state.desktopId);
  const qsd = await traced('qsd-start', () => StorageDaemon.start(dir));
  const clients: NbdClient[] = [];
  try {
    const socket = join(dir, 'upload.sock');
    await traced('qsd-open-chain', async () => {
      for (const [i, d] of disks.entries()) await addChain(qsd, specFor(d, i, null, true), d.chain.secret, d.chain.baseSecret);
      await qsd.exportNbd(socket, disks.map((d, i) => ({ node: `${diskPrefix(i)}-top`, name: d.name, writable: false })));
    });
    const readers: DiskReader[] = [];
    for (const [i, d] of disks.entries()) {
      const top = await NbdClient.connect(socket, d.name);
      clients.push(top);
      readers.push({ disk: d, top, extents: await maps[i]! });
    }
    return await fn(readers);
  } finally {
    await traced('qsd-stop', async () => {
      for (const c of clients) await c.close();
      await qsd.stop();
    });
  }
}

/** How a check-in treats a desktop that is running: the guest's shutdown is waited for this long, then refused, or forced. */
export interface RunningCheckin {
  shutdownGraceMs?: number;
  force?: boolean;
  /** A background replica (client/background.ts): a running desktop's fold yields to the guest's I/O. Check-ins never are. */
  background?: boolean;
}

const DEFAULT_SHUTDOWN_GRACE_MS = 120_000;

/**
 * After a committed check-in, if policy keeps local copies: the top is merged into the base
 * (which then equals the new snapshot; resumed on the rerun if killed: `parking` and `mergingTo`
 * in the MACed state) and the base is parked. The caller erases the vault afterwards.
 */
async function parkCheckin(env: ClientEnv, device: DeviceIdentity, vault: Vault, state: DesktopState, keys: DesktopKeys, wrapKey: WrapKey | null, disks: DesktopDisk[], changes: DiskChanges[], snapshotId: string, unlockShare: string | null): Promise<boolean> {
  if (!keepsLocalCopy(state)) return false;
  let next: DesktopState = { ...state, state: 'checking_in', parking: snapshotId };
  for (const m of changedManifests(disks, changes)) {
    const digest = await vault.putManifest(state.desktopId, m.manifest);
    next = { ...next, disks: next.disks.map((d) => (d.name === m.name && d.baseDigest !== digest ? { ...d, mergingTo: digest } : d)) };
  }
  await traced('park-save', () => vault.save(next, keys));
  const merged = (await traced('park-merge', () => openDesktopDisks(vault, next, keys))).state;
  return parkBases({ vault, device, password: await env.password(), state: merged, keys, how: 'checkin', disks: merged.disks.map((d) => ({ name: d.name, digest: d.baseDigest, known: null })), log: env.log, wrapKey, unlockShare });
}

/** A check-in killed after its commit, while its bases were merged or parked: finishes that, then erases the vault. */
async function finishParking(env: ClientEnv, device: DeviceIdentity, vault: Vault, state: DesktopState, keys: DesktopKeys, wrapKey: WrapKey | null, kind: UploadKind, unlockShare: string | null) {
  if (kind !== 'checkin') throw new CarryonError('wrong-state', `${state.name} was checked in already; run \`carryon checkin ${state.name}\` to finish putting its local copy away`);
  await finishPark(env, device, vault, state, keys, wrapKey, unlockShare);
  return { snapshotId: state.parking!, changedChunks: 0, chunksSent: 0, bytesSent: 0, replicaKind: null };
}

/**
 * The rest of a committed check-in's park (`state.parking`, MACed: saved only once the broker
 * answered the commit): the merge and the parked copy, then the vault is erased. A check-in's rerun
 * and a check-out of the same desktop both finish it here. `wrapKey`: the one that just opened the
 * vault, reused for the parked copy's wrap (no second KDF).
 */
export async function finishPark(env: ClientEnv, device: DeviceIdentity, vault: Vault, state: DesktopState, keys: DesktopKeys, wrapKey: WrapKey | null, unlockShare: string | null = null): Promise<void> {
  if (!state.parking) throw new CarryonError('wrong-state', `${state.name} has no check-in to finish putting away`);
  const release = await claimOwner(vault, state.desktopId, 'checkin', env.log);
  try {
    if (await parkedFrom(vault, state)) {
      await unlinkVaultBases(vault, state);
      await stampParked(vault.home, state.desktopId, keys.vaultKey);
    } else {
      const merged = (await openDesktopDisks(vault, state, keys)).state;
      await parkBases({ vault, device, password: await env.password(), state: merged, keys, how: 'checkin', disks: merged.disks.map((d) => ({ name: d.name, digest: d.baseDigest, known: null })), log: env.log, wrapKey, unlockShare })
        .catch((err: unknown) => env.log(`no parked copy kept of ${state.name}: ${(err as Error).message}`));
    }
  } finally {
    await release();
  }
  await vault.wipe(state.desktopId);
  env.log(`checked in ${state.name} (the check-in had been committed before it was cut off)`);
}


/** The owner claim an upload takes (a hand-back claims as a check-in; the agent's replica as a background one). */
function claimFor(env: ClientEnv, vault: Vault, desktopId: string, kind: UploadKind, running: RunningCheckin): Promise<() => Promise<void>> {
  return traced('claim-owner', () => claimOwner(vault, desktopId, kind === 'handback' ? 'checkin' : kind, env.log, { background: kind === 'replicate' && running.background === true }));
}

/**
 * Work that needs no key, started while the broker checks the password (its scrypt: ≈ 100 ms in
 * which the laptop only waited): the owner claim, then the layers' shapes (for the guard) and the
 * tops' maps, each used later only if its file did not change since (ReadAhead). Null where the
 * desktop runs (the live paths claim nothing here) or a committed check-in's park is to be
 * finished (that claims on its own).
 */
async function beforeKeys(env: ClientEnv, vault: Vault, found: DesktopState, kind: UploadKind, running: RunningCheckin): Promise<{ release: () => Promise<void>; ahead: ReadAhead } | null> {
  if (found.parking) return null;
  const holder = await readOwner(vault, found.desktopId);
  if (holder?.kind === 'run' || holder?.kind === 'serve') return null;
  const release = await claimFor(env, vault, found.desktopId, kind, running);
  const ahead = new ReadAhead();
  for (const d of found.disks) {
    vault.readManifestAhead(found.desktopId, d.baseDigest);
    const files = chainFiles(diskDir(vault, found.desktopId, d.name), d.top);
    ahead.start(measureLayer, files.base);
    ahead.start(measureLayer, files.top);
    ahead.start(presentRanges, files.top);
  }
  return { release, ahead };
}

/** Check-in, replicate or hand-back: send only the chunks changed since the checkpoint, then commit. */
export async function upload(env: ClientEnv, desktopRef: string, kind: UploadKind, running: RunningCheckin = {}): Promise<UploadResult> {
  const device = await loadDevice(env.home);
  const vault = await traced('vault-open', () => Vault.open(env.home));
  const found = await traced('vault-find', () => vault.find(desktopRef));
  if (found.state === 'transferring') throw new CarryonError('wrong-state', `${found.name} is still being checked out`);
  const password = await env.password();
  const early = beforeKeys(env, vault, found, kind, running);
  early.catch(() => undefined);
  // The login's answer brings the check-out's unlock share (one round trip less).
  const { broker } = await traced('login', () => onlineSession(env, device, found.keys.online ? found.checkoutId : undefined)).catch(async (err: unknown) => {
    await early.then((e) => e?.release(), () => undefined);
    throw err;
  });
  let claimed: Awaited<typeof early> = null;
  try {
    // A claim refused (the desktop is busy) is said once the login is done with.
    claimed = await early;
    // The broker has just checked the password: its share opens the vault's online wrap, no KDF
    // (client/vault/online-unlock.ts); where it gives none, the password's wrap (scrypt) opens it.
    // The same share seals a parked copy's online wrap, which the next check-out opens without the KDF (parked.ts).
    // Asked now, answered while the keys open and the layers are checked (sendChanges needs it).
    const entry = findEntry(broker, found.desktopId);
    entry.catch(() => undefined);
    const unlockShare = await fetchUnlockShare(broker, found, env.log);
    const opened0 = await vault.openKeys(device, password, found, { unlockShare });
    const keys = opened0.keys;
    const wrapKey = opened0.wrapKey;
    let state = opened0.state;
    if (state.parking) {
      await claimed?.release();
      claimed = null;
      return await finishParking(env, device, vault, state, keys, wrapKey, kind, unlockShare);
    }
    // Claimed ahead: nothing else holds the desktop.
    const holder = claimed ? null : await readOwner(vault, state.desktopId);
    if (kind === 'replicate' && (holder?.kind === 'run' || holder?.kind === 'serve')) {
      // The desktop runs: the process holding its chain takes the point in time (src/live/).
      const live = await liveReplicate({ env, broker, vault, state, keys, background: running.background === true });
      env.log(`replicated ${state.name} while it runs: restore point ${live.commit.snapshotId} (${live.kind}), ${live.sent.chunksMoved} chunks sent (${live.sent.bytesMoved} bytes)`);
      return { snapshotId: live.commit.snapshotId, changedChunks: live.changes.changedChunks, chunksSent: live.sent.chunksMoved, bytesSent: live.sent.bytesMoved, replicaKind: live.kind };
    }
    if (kind === 'checkin' && (holder?.kind === 'run' || holder?.kind === 'serve')) {
      return await checkinRunning(env, desktopRef, { vault, state, keys, holder: holder.kind, running });
    }
    const ahead = claimed?.ahead;
    const release = claimed?.release ?? await claimFor(env, vault, state.desktopId, kind, running);
    claimed = null; // released below
    let outcome;
    // The tops' key slots open while the disks are opened and checked (no data is read before the guard passed).
    const settled = state.disks.every((d) => !d.under && !d.mergingTo);
    const tops = settled ? traced('open-tops', () => openTops(state.disks.map((d) => chainOf(vault, state, keys, d.name)).map((c) => ({ path: c.files.top, secret: layerSecret(c, 'top') })))) : null;
    tops?.catch(() => undefined);
    try {
      const opened = await traced('open-disks', () => openDesktopDisks(vault, state, keys));
      state = await traced('guard-upload', () => guardUpload(vault, opened.state, keys, env.log, ahead));
      outcome = await withReaders(vault, state, opened.disks, ahead, tops, (readers) => sendChanges({
        env, broker, vault, state, keys, kind, readers, background: kind === 'replicate' && running.background === true, entry,
        saveCheckingIn: kind === 'checkin' ? (jobId) => vault.save({ ...state, state: 'checking_in', jobId }, keys) : undefined,
      }));
      if (kind === 'replicate') {
        // The restore point becomes the base: merge the top into it (resumed on the next open if killed).
        let next: DesktopState = { ...state, lastReplicationAt: new Date().toISOString(), lastReplicaKind: 'stopped' };
        for (const m of changedManifests(opened.disks, outcome.changes.changes)) {
          const digest = await vault.putManifest(state.desktopId, m.manifest);
          next = { ...next, disks: next.disks.map((d) => (d.name === m.name ? { ...d, mergingTo: digest } : d)) };
        }
        await vault.save(next, keys);
        await openDesktopDisks(vault, next, keys);
      }
      if (kind === 'checkin') {
        // The laptop keeps the desktop as checked in (policy keepLocalCopy): the next check-out moves only what changed.
        const done = outcome;
        await traced('park', () => parkCheckin(env, device, vault, state, keys, wrapKey, opened.disks, done.changes.changes, done.commit.snapshotId, unlockShare)).catch((err: unknown) => env.log(`no parked copy kept of ${state.name}: ${(err as Error).message}`));
      }
    } finally {
      // Readers opened ahead and not used (a refusal before the reads): closing twice is nothing.
      await tops?.then((o) => Promise.all(o?.readers.map((r) => r.close()) ?? []), () => undefined);
      await traced('release-owner', release);
    }
    const { changes, sent, commit, recovered } = outcome;
    const lost = recovered ? ' (the broker had committed it before; its answer was lost)' : '';
    if (kind === 'checkin') {
      await traced('vault-wipe', () => vault.wipe(state.desktopId));
      env.log(`checked in ${state.name}: ${changes.changedChunks} changed chunks, ${sent.chunksMoved} sent (${sent.bytesMoved} bytes); snapshot ${commit.snapshotId}${lost}`);
    } else if (kind === 'handback') {
      // The work is on the server now; the check-out had ended, so the local copy goes as after a check-in.
      await vault.wipe(state.desktopId);
      env.log(`handed back ${state.name}: restore point ${commit.snapshotId}${lost}, ${changes.changedChunks} changed chunks; it is not the current version until an administrator restores it`);
    } else {
      env.log(`replicated ${state.name}: restore point ${commit.snapshotId}, ${sent.chunksMoved} chunks sent (${sent.bytesMoved} bytes)`);
    }
    return { snapshotId: commit.snapshotId, changedChunks: changes.changedChunks, chunksSent: sent.chunksMoved, bytesSent: sent.bytesMoved, replicaKind: kind === 'replicate' ? ('stopped' as const) : null };
  } finally {
    await claimed?.release();
    await traced('broker-close', () => broker.close());
  }
}

export interface UploadResult {
  snapshotId: string;
  changedChunks: number;
  chunksSent: number;
  bytesSent: number;
  replicaKind: 'quiesced' | 'crash-consistent' | 'stopped' | null;
  /** A running desktop's check-in: seconds from the guest's power-off to the commit (what the user waited for). */
  offToCommitSeconds?: number;
}

/**
 * Check-in of a running desktop: the bulk goes as a live replica while the guest runs, then the
 * guest is shut down (ACPI; refused after the grace period unless forced), and the check-in
 * sends only what was written since the replica.
 */
async function checkinRunning(env: ClientEnv, desktopRef: string, o: { vault: Vault; state: DesktopState; keys: DesktopKeys; holder: 'run' | 'serve'; running: RunningCheckin }): Promise<UploadResult> {
  const { vault, state } = o;
  const { broker } = await onlineSession(env);
  try {
    const bulk = await liveReplicate({ env, broker, vault, state, keys: o.keys });
    env.log(`checking in ${state.name} while it runs: ${bulk.sent.chunksMoved} chunks (${bulk.sent.bytesMoved} bytes) sent ahead as restore point ${bulk.commit.snapshotId}`);
  } finally {
    await broker.close();
  }
  const control = await ControlClient.connect(await liveSocketPath({ vault, state }), controlKey(o.keys, state.desktopId));
  const grace = o.running.shutdownGraceMs ?? DEFAULT_SHUTDOWN_GRACE_MS;
  try {
    env.log(o.holder === 'run' ? `asking the guest to shut down (ACPI; up to ${Math.round(grace / 1000)} s)…` : 'asking `carryon serve` to stop serving the disk…');
    // The holder may be gone before its answer is written (QEMU exited, it let go): that is the answer.
    await control.shutdown(grace, o.running.force ?? false).catch((err: unknown) => {
      if (!(err instanceof CarryonError && err.code === 'holder-gone')) throw err;
    });
  } finally {
    control.close();
  }
  const off = performance.now();
  // The holder records its layers and gives up the desktop once QEMU has gone.
  for (let i = 0; (await readOwner(vault, state.desktopId)) !== null; i++) {
    if (i >= 600) throw new CarryonError('disk-busy', `the desktop's ${o.holder} process did not end within 60 s of the guest's shutdown; the replica was sent: run \`carryon checkin ${state.name}\` again once it has`);
    await new Promise((r) => setTimeout(r, 100));
  }
  const rest = await upload(env, desktopRef, 'checkin');
  const offToCommitSeconds = (performance.now() - off) / 1000;
  env.log(`${state.name}: ${offToCommitSeconds.toFixed(2)} s from the guest's power-off to the check-in's commit`);
  return { ...rest, offToCommitSeconds };
}
