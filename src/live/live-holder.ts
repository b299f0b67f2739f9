import { rm } from 'node:fs/promises';
import { join } from 'node:path';
import { CarryonError } from '../core/errors.js';
import { chainFiles, createLayer, otherTop, topExtents } from '../disk/chain.js';
import type { BlockHost } from '../disk/storage-daemon.js';
import { serveControl, type ControlHandler, type ControlKey, type HolderStatus } from './control.js';
import { recordMac, recordMacOk, type DesktopKeys } from './disks/desktop-keys.js';
import { LiveChain, type LiveLayers, type Quiesce } from './live-chain.js';
import { chainOf, diskDir, socketDir, templatesDir } from './disks/disks.js';
import { diskPrefix } from './fill/holder.js';
import { fileStamp } from '../files/stamped.js';
import type { HeldDesktop } from './fill/holder.js';
import type { DesktopState } from './disks/state.js';

/** The control requests' key: from the vault key, so only a process that unlocked this desktop has it. */
export function controlKey(keys: DesktopKeys, desktopId: string): ControlKey {
  return {
    sign: (data) => recordMac(keys, desktopId, 'live-control', data),
    verify: (data, mac) => recordMacOk(keys, desktopId, 'live-control', data, mac),
  };
}

/** The control socket of a held desktop (src/live/control.ts). */
export async function liveSocketPath(held: { vault: HeldDesktop['vault']; state: { desktopId: string } }): Promise<string> {
  return join(await socketDir(held.vault, held.state.desktopId), 'live.sock');
}

/**
 * The laptop's vault as a live chain's layer store: every change of the chain's layout is in the
 * MACed state before QEMU makes it (or after, where the state before it still opens correctly).
 */
export function vaultLayers(held: HeldDesktop): LiveLayers {
  const entry = (s: DesktopState, name: string) => {
    const d = s.disks.find((x) => x.name === name);
    if (!d) throw new Error(`no disk ${name}`);
    return d;
  };
  const withDisk = (s: DesktopState, name: string, change: Partial<DesktopState['disks'][number]>): DesktopState => ({ ...s, disks: s.disks.map((x) => (x.name === name ? { ...x, ...change } : x)) });
  const dir = (name: string) => diskDir(held.vault, held.state.desktopId, name);
  return {
    disks: () => held.state.disks.map((d, i) => ({ name: d.name, prefix: diskPrefix(i), topSecretId: `sec-${diskPrefix(i)}`, baseDigest: d.baseDigest })),
    topPath: (name) => join(dir(name), entry(held.state, name).top),
    async beginPoint(name) {
      const d = entry(held.state, name);
      if (d.under) throw new CarryonError('replica-busy', `disk ${name} already has a frozen layer`);
      const next = otherTop(d.top);
      const chain = chainOf(held.vault, held.state, held.keys, name);
      const disk = held.disks.find((x) => x.name === name)!;
      // An empty top, re-keyed from the laptop's template (milliseconds), made whole before the state names it.
      await createLayer({ ...chain, files: chainFiles(dir(name), next) }, 'top', disk.base.diskSize, disk.base.chunkSize, templatesDir(held.vault.home));
      await held.updateState((s) => withDisk(s, name, { under: entry(s, name).top, top: next }));
      killAt('point-begun');
      return join(dir(name), next);
    },
    async acknowledged(digests, kind) {
      await held.updateState((s) => ({
        ...s,
        lastReplicationAt: new Date().toISOString(),
        lastReplicaKind: kind,
        disks: s.disks.map((d) => (digests.has(d.name) ? { ...d, mergingTo: digests.get(d.name)! } : d)),
      }));
      killAt('acknowledged');
      // Part-way into the fold's block-commit (the job starts right after this returns).
      if (process.env.NODE_ENV === 'test' && process.env.CARRYON_TEST_SIGKILL_AT === 'folding') setTimeout(() => process.kill(process.pid, 'SIGKILL'), Number(process.env.CARRYON_TEST_SIGKILL_DELAY_MS ?? 3));
    },
    async folded(name) {
      const d = entry(held.state, name);
      if (!d.under || !d.mergingTo) throw new Error(`disk ${name} has nothing being folded`);
      const files = chainFiles(dir(name), d.top);
      // The base now holds the restore point (the chunk IDs this laptop's pages were named by). Its
      // shape is not recorded while QEMU holds it (QEMU may still write its tables after the job's
      // end: measured, a record taken here failed to match after a kill); the clean close records
      // it, and until then a crash leaves the base unbound, as it leaves the top.
      const baseVerified = await fileStamp(files.base);
      const manifest = await held.vault.manifest(held.state.desktopId, d.mergingTo);
      await held.updateState((s) => withDisk(s, name, { baseDigest: d.mergingTo!, mergingTo: null, under: null, shapes: { ...entry(s, name).shapes, base: null }, baseVerified }));
      const disk = held.disks.find((x) => x.name === name);
      if (disk) Object.assign(disk, { base: manifest, entry: entry(held.state, name), chain: chainOf(held.vault, held.state, held.keys, name) });
      killAt('folded');
      await rm(join(dir(name), d.under), { force: true });
    },
    async abandoned(name) {
      const d = entry(held.state, name);
      if (!d.under) throw new Error(`disk ${name} has no frozen layer`);
      await held.updateState((s) => withDisk(s, name, { top: d.under!, under: null }));
      const disk = held.disks.find((x) => x.name === name);
      if (disk) Object.assign(disk, { entry: entry(held.state, name), chain: chainOf(held.vault, held.state, held.keys, name) });
      await rm(join(dir(name), d.top), { force: true });
    },
    async frozenExtents(name) {
      return topExtents(chainOf(held.vault, held.state, held.keys, name, 'under'));
    },
  };
}

/**
 * Lets other processes take live replicas of a desktop this process holds (run or serve) and
 * ask it to shut down, through its control socket.
 */
export async function startLiveControl(held: HeldDesktop, host: BlockHost, opts: {
  kind: HolderStatus['kind'];
  nbd: { socketPath: string; ensureServer: () => Promise<void> };
  quiesce?: Quiesce;
  guestAgent: () => boolean | null;
  shutdown: (graceMs: number, force: boolean) => Promise<void>;
  log: (l: string) => void;
  /** The QEMU process holding the chain (the kill tests' second target). */
  qemuPid?: number;
  /** USB hot-plug and power events, where a guest runs (client/run-devices.ts). */
  devices?: Pick<ControlHandler, 'usb' | 'power'>;
}): Promise<{ live: LiveChain; close(): Promise<void> }> {
  qemuPid = opts.qemuPid ?? null;
  const live = new LiveChain(host, vaultLayers(held), opts.nbd, opts.quiesce);
  const control = await serveControl(await liveSocketPath(held), {
    async freeze(o) {
      if (held.state.state !== 'checked_out' || held.state.disks.some((d) => !d.complete)) {
        throw new CarryonError('wrong-state', `${held.state.name} is still being checked out: a replica is possible once it is entirely local (\`carryon status\`)`);
      }
      await held.stopChecks();
      const point = await live.freeze(o);
      killAt('point-taken');
      opts.log(`replica of ${held.state.name}: point in time taken (${point.kind}, guest I/O paused ${point.pausedMs.toFixed(1)} ms)`);
      return point;
    },
    fold: (id, digests, o) => live.fold(id, digests, o),
    abandon: (id) => live.abandon(id),
    // A background fold in flight goes on at full speed: the guest's stop waits on it.
    shutdown: async (graceMs, force) => { await live.hurry(); await opts.shutdown(graceMs, force); },
    status: async () => ({ kind: opts.kind, pid: process.pid, guestAgent: opts.guestAgent(), pointOpen: live.pointOpen }),
    ...opts.devices,
  }, controlKey(held.keys, held.state.desktopId), opts.log);
  return { live, close: () => control.close() };
}

/**
 * Test-only: CARRYON_TEST_SIGKILL_AT=<step> (under NODE_ENV=test) kills the holder at that step of
 * a live replica (point-begun, point-taken, acknowledged, folding, folded), other work in flight;
 * `<step>:qemu` kills the QEMU that holds the chain instead.
 */
let qemuPid: number | null = null;

function killAt(step: string): void {
  if (process.env.NODE_ENV !== 'test') return;
  const at = process.env.CARRYON_TEST_SIGKILL_AT;
  if (at === step) process.kill(process.pid, 'SIGKILL');
  // `<step>:qemu`: QEMU alone dies there; this process lives on and must notice.
  if (at === `${step}:qemu` && qemuPid) process.kill(qemuPid, 'SIGKILL');
}
