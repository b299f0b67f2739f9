import { randomBytes } from 'node:crypto';
import { chmod, rm } from 'node:fs/promises';
import { syncPath } from '../files/atomic.js';
import { CarryonError } from '../core/errors.js';
import type { Range } from '../core/chunks/delta.js';
import type { BlockHost } from '../disk/storage-daemon.js';
import { QmpError, type QmpEvent } from '../qemu/qmp.js';

/**
 * Replicas of a running chain, taken inside the process that holds it (QEMU for `carryon run`,
 * qemu-storage-daemon for `serve`; a datacenter host the same way) and driven over its QMP:
 *
 * 1. freeze: a new empty top per disk is added and made the active layer of every disk in one
 *    QMP transaction (`blockdev-snapshot`): the guest pauses for that transaction only. The old
 *    top is now frozen; it holds exactly what was written since the base, at one point in time.
 * 2. The frozen view (old top over base) is exported read-only on the holder's NBD server; the
 *    replica's sender reads the pages the frozen layer holds from there.
 * 3. fold (the broker acknowledged): `block-commit` of the frozen layer into the base, with the
 *    guest writing on above. The base then equals the restore point; the top holds only what was
 *    written since the freeze.
 *    abandon (not acknowledged): the new top is committed down into the frozen one (an active
 *    commit that pivots), so the chain is as before the freeze with every write kept.
 *
 * No second writer opens a layer the holder has open. What the chain looks like on disk at each
 * step is made durable by the `LiveLayers` store *before* the step, so a kill at any point leaves
 * a chain that the next open settles (client/disks.ts settleLiveLayers).
 */

/** One disk of the held chain, as the holder's store knows it. */
export interface LiveDisk {
  name: string;
  /** Node-name prefix of this disk's chain in the holder (`<prefix>-base` is the base). */
  prefix: string;
  /** The secret object the top layers are opened with (already in the holder). */
  topSecretId: string;
  /** The checkpoint the base holds: a replica is relative to it. */
  baseDigest: string;
}

/** Where the chain's layout is kept: every call is durable before it returns. */
export interface LiveLayers {
  disks(): LiveDisk[];
  /** Makes an empty top layer file for `disk` and records it as the active top over the current one (frozen from now on). Returns its path. */
  beginPoint(disk: string): Promise<string>;
  /** The broker acknowledged the point: the frozen layers are to be folded into their bases (`digests`: what each base then holds). */
  acknowledged(digests: ReadonlyMap<string, string>, kind: ReplicaKind): Promise<void>;
  /** The frozen layer of `disk` is in its base (and closed): record the base, drop the layer's file. */
  folded(disk: string): Promise<void>;
  /** The top of `disk` went back down into the frozen layer (closed): that layer is the top again. */
  abandoned(disk: string): Promise<void>;
  /** Bytes ranges the frozen layer of `disk` holds (read while nothing writes it). */
  frozenExtents(disk: string): Promise<Range[]>;
  /** The file of `disk`'s active top layer, as the layout names it now. */
  topPath(disk: string): string;
}

export type ReplicaKind = 'quiesced' | 'crash-consistent';

/** Runs the point in time (milliseconds) with the guest's file systems frozen where its agent answers. */
export type Quiesce = <T>(pointInTime: () => Promise<T>) => Promise<{ result: T; kind: ReplicaKind; reason?: string }>;

export const crashConsistent: Quiesce = async (pointInTime) => ({ result: await pointInTime(), kind: 'crash-consistent', reason: 'no guest agent' });

/** A frozen point: what the sender reads, per disk. */
export interface FrozenPoint {
  id: string;
  kind: ReplicaKind;
  reason?: string;
  /** Milliseconds the guest's I/O waited for the transaction (and the freeze, when quiesced). */
  pausedMs: number;
  socketPath: string;
  disks: { name: string; exportName: string; baseDigest: string; extents: Range[] }[];
}

/** How long a fold or an abandon may take (a large frozen layer on a slow disk). */
const JOB_TIMEOUT_MS = 3_600_000;

/**
 * A background replica's fold copies at most this many bytes a second (QEMU's block-job `speed`):
 * the guest's own I/O goes first. Each written 4 KiB page costs the holder a read and a write (both
 * through LUKS), as much as a guest write; at 8 MiB/s that is 2,048 pages a second, and minutes of
 * office work fold in seconds. Lifted (`hurry`) the moment anyone waits on the chain: a check-in's
 * freeze, a shutdown.
 */
export const BACKGROUND_FOLD_BYTES_PER_S = 8 * 2 ** 20;

export class LiveChain {
  /** Node name of each disk's active top (the initial `<prefix>-top`, then one per point). */
  private readonly active = new Map<string, string>();
  private point: { id: string; frozen: Map<string, string>; kind: ReplicaKind; exports: string[] } | null = null;
  private generation = 0;
  private busy: Promise<unknown> = Promise.resolve();
  /** The fold job running with a speed limit, if one is: `hurry` lifts it. */
  private slowJob: string | null = null;

  constructor(
    private readonly host: BlockHost,
    private readonly layers: LiveLayers,
    private readonly nbd: { socketPath: string; ensureServer: () => Promise<void> },
    private readonly quiesce: Quiesce = crashConsistent,
  ) {
    for (const d of layers.disks()) this.active.set(d.name, `${d.prefix}-top`);
  }

  get pointOpen(): boolean {
    return this.point !== null;
  }

  /** One step at a time: a fold never overlaps a freeze, whoever asked. */
  private serial<T>(fn: () => Promise<T>): Promise<T> {
    const run = this.busy.then(fn, fn);
    this.busy = run.catch(() => undefined);
    return run;
  }

  /**
   * Takes a point in time, after the fold before it. Someone waiting (a check-in, an interactive
   * replica) hurries a background fold to full speed; a background replica waits behind it at
   * its pace: nobody waits on it, and a fold hurried at every scheduled replica would take the
   * holder from the guest exactly when the guest writes the most.
   */
  freeze(opts: { background?: boolean } = {}): Promise<FrozenPoint> {
    if (!opts.background) void this.hurry();
    return this.serial(() => this.freezeNow());
  }

  /** A background fold in flight goes on at full speed (a check-in or a shutdown is waiting on it). */
  async hurry(): Promise<void> {
    const job = this.slowJob;
    if (!job) return;
    this.slowJob = null;
    await this.host.qmp.execute('block-job-set-speed', { device: job, speed: 0 }).catch(() => undefined);
  }

  private async freezeNow(): Promise<FrozenPoint> {
    if (this.point) throw new CarryonError('replica-busy', 'a replica of this desktop is already being taken');
    const disks = this.layers.disks();
    // The transaction flushes the old top inside its drained section: whatever the guest wrote
    // that is not yet on disk is written back while the guest waits. Written back here first, the
    // guest running on, that wait holds only the last moment's writes.
    await Promise.all(disks.map((d) => syncPath(this.layers.topPath(d.name), true)));
    const overlays = new Map<string, string>();
    this.generation++;
    for (const d of disks) {
      const path = await this.layers.beginPoint(d.name);
      const node = `${d.prefix}-top-g${this.generation}-${randomBytes(3).toString('hex')}`;
      // The same options the top has (chain.ts): LUKS with the top secret, discard passed down.
      await this.host.qmp.execute('blockdev-add', {
        driver: 'qcow2', 'node-name': node, file: { driver: 'file', filename: path, locking: 'on' },
        encrypt: { format: 'luks', 'key-secret': d.topSecretId }, backing: null, discard: 'unmap',
      });
      overlays.set(d.name, node);
    }
    const frozen = new Map(disks.map((d) => [d.name, this.active.get(d.name)!]));
    const actions = disks.map((d) => ({ type: 'blockdev-snapshot', data: { node: frozen.get(d.name)!, overlay: overlays.get(d.name)! } }));
    let pausedMs = 0;
    const taken = await this.quiesce(async () => {
      const t0 = performance.now();
      await this.host.qmp.execute('transaction', { actions });
      pausedMs = performance.now() - t0;
    });
    for (const d of disks) this.active.set(d.name, overlays.get(d.name)!);
    const id = randomBytes(8).toString('hex');
    this.point = { id, frozen, kind: taken.kind, exports: [] };
    await this.nbd.ensureServer();
    const out: FrozenPoint['disks'] = [];
    for (const d of disks) {
      const exportName = `replica-${d.name}`;
      const exportId = `replica-exp-${d.prefix}`;
      await this.host.qmp.execute('block-export-add', { type: 'nbd', id: exportId, 'node-name': frozen.get(d.name)!, name: exportName, writable: false });
      this.point.exports.push(exportId);
      out.push({ name: d.name, exportName, baseDigest: d.baseDigest, extents: await this.layers.frozenExtents(d.name) });
    }
    return { id, kind: taken.kind, reason: taken.reason, pausedMs, socketPath: this.nbd.socketPath, disks: out };
  }

  /**
   * The broker acknowledged point `id`: each frozen layer goes into its base, the guest writing on.
   * `background`: the fold copies at BACKGROUND_FOLD_BYTES_PER_S until someone hurries it.
   */
  fold(id: string, digests: ReadonlyMap<string, string>, opts: { background?: boolean } = {}): Promise<void> {
    return this.serial(async () => {
      const point = this.expect(id);
      await this.dropExports(point.exports);
      await this.layers.acknowledged(digests, point.kind);
      for (const d of this.layers.disks()) {
        const frozen = point.frozen.get(d.name)!;
        const jobId = `fold-${d.prefix}-${this.generation}`;
        this.slowJob = opts.background ? jobId : null;
        await this.runJob(jobId, {
          device: this.active.get(d.name)!, 'top-node': frozen, 'base-node': `${d.prefix}-base`,
          // The active top's header then names no backing file: the chain is always given whole (chain.ts).
          'backing-file': '',
          ...(opts.background ? { speed: BACKGROUND_FOLD_BYTES_PER_S } : {}),
        }, false).finally(() => (this.slowJob = null));
        await this.host.qmp.execute('blockdev-del', { 'node-name': frozen });
        await this.layers.folded(d.name);
      }
      this.point = null;
    });
  }

  /** Point `id` will not be acknowledged: the writes since it go down into the frozen layer, which is the top again. */
  abandon(id: string): Promise<void> {
    return this.serial(async () => {
      const point = this.expect(id);
      await this.dropExports(point.exports);
      for (const d of this.layers.disks()) {
        const frozen = point.frozen.get(d.name)!;
        const overlay = this.active.get(d.name)!;
        await this.runJob(`unfreeze-${d.prefix}-${this.generation}`, { device: overlay, 'base-node': frozen }, true);
        this.active.set(d.name, frozen);
        await this.host.qmp.execute('blockdev-del', { 'node-name': overlay });
        await this.layers.abandoned(d.name);
      }
      this.point = null;
    });
  }

  private expect(id: string) {
    if (!this.point || this.point.id !== id) throw new CarryonError('no-replica', `no replica ${id} is open on this desktop`);
    return this.point;
  }

  private async dropExports(ids: string[]): Promise<void> {
    for (const id of ids.splice(0)) {
      // Hard: a reader still connected (a sender killed mid-read) must not keep the frozen node.
      await this.host.qmp.execute('block-export-del', { id, mode: 'hard' }).catch((err: unknown) => {
        if (!(err instanceof QmpError && /not found/i.test(err.desc))) throw err;
      });
      await this.host.qmp.waitEvent((e) => e.event === 'BLOCK_EXPORT_DELETED' && e.data?.id === id, 30_000).catch(() => undefined);
    }
  }

  /** A block-commit job to its end: an active commit (`pivot`) is completed when ready. */
  private async runJob(jobId: string, args: Record<string, unknown>, pivot: boolean): Promise<void> {
    const mine = (name: string) => (e: QmpEvent) => e.event === name && e.data?.device === jobId;
    await this.host.qmp.execute('block-commit', { 'job-id': jobId, ...args });
    const ended = (e: QmpEvent) => mine('BLOCK_JOB_COMPLETED')(e) || mine('BLOCK_JOB_CANCELLED')(e);
    if (pivot) {
      const ready = await this.host.qmp.waitEvent((e) => mine('BLOCK_JOB_READY')(e) || ended(e), JOB_TIMEOUT_MS);
      if (ended(ready)) throw new CarryonError('live-job-failed', `QEMU's ${jobId} job ended before it was ready: ${String(ready.data?.error ?? ready.event)}`);
      await this.host.qmp.execute('job-complete', { id: jobId });
    }
    const done = await this.host.qmp.waitEvent(ended, JOB_TIMEOUT_MS);
    const error = done.data?.error;
    if (done.event === 'BLOCK_JOB_CANCELLED' || typeof error === 'string') throw new CarryonError('live-job-failed', `QEMU's ${jobId} job failed: ${String(error ?? 'cancelled')}`);
  }
}

/**
 * The NBD server a VM's QEMU exports frozen layers on: a unix socket only its owner may open,
 * started at the first point (`carryon run`'s guest and a desktop host's alike).
 */
export function vmReplicaServer(qmp: (command: string, args?: Record<string, unknown>) => Promise<unknown>, socketPath: string): { socketPath: string; ensureServer: () => Promise<void> } {
  let started: Promise<void> | null = null;
  const ensureServer = () =>
    (started ??= (async () => {
      await rm(socketPath, { force: true });
      await qmp('nbd-server-start', { addr: { type: 'unix', data: { path: socketPath } } });
      await chmod(socketPath, 0o600);
    })());
  return { socketPath, ensureServer };
}

