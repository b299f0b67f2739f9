import { existsSync, readFileSync } from 'node:fs';
import { readFile, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { CarryonError } from '../core/errors.js';
import type { LineageKeys } from '../core/keys.js';
import { decodeManifest, encodeManifest, manifestDigest, type Manifest } from '../core/chunks/manifest.js';
import { chainFiles, createLayer, otherTop, topExtents, type Chain } from '../disk/chain.js';
import { writeFileAtomic } from '../files/atomic.js';
import type { RunningDesktop } from '../hypervisor/launch.js';
import { LiveChain, vmReplicaServer, type LiveLayers } from '../live/live-chain.js';
import { NbdClient } from '../nbd/client.js';
import type { TransferEndpoint } from '../transfer-client/client.js';
import { frozenChain, readLayout, recordBase, settleLayout, writeLayout } from './layout.js';
import { sendPages } from './send-back.js';

export interface ReplicaDisk {
  name: string;
  dir: string;
  chain: () => Chain;
}

const readBase = async (dir: string) => decodeManifest(await readFile(join(dir, 'base.manifest')));
const nextManifest = (dir: string) => readFile(join(dir, 'next.manifest')).then(decodeManifest);

/** Ends a replica a killed host left open (layout.ts), before the chain is opened again. */
export async function settleReplica(disks: ReplicaDisk[]): Promise<void> {
  for (const d of disks) if (existsSync(d.dir)) await settleLayout(d.dir, d.chain(), () => nextManifest(d.dir));
}

/**
 * The host's chain files as a live chain's layer store (the laptop's is live-holder.ts
 * vaultLayers): each layout change is in `layout.json` before QEMU makes it. Disk `i` is the
 * guest's `d<i>` (guest.ts), its top secret `host-d<i>-top`.
 */
export function hostLayers(disks: ReplicaDisk[], templates: string): LiveLayers {
  const digests = new Map<string, string>();
  // Read once per guest's chain (its base is complete: it runs).
  for (const d of disks) digests.set(d.name, (JSON.parse(readFileSync(join(d.dir, 'base.json'), 'utf8')) as { digest: string }).digest);
  const disk = (name: string) => disks.find((d) => d.name === name)!;
  return {
    disks: () => disks.map((d, i) => ({ name: d.name, prefix: `d${i}`, topSecretId: `host-d${i}-top`, baseDigest: digests.get(d.name)! })),
    topPath: (name) => join(disk(name).dir, readLayout(disk(name).dir).top),
    async beginPoint(name) {
      const d = disk(name);
      const l = readLayout(d.dir);
      if (l.under) throw new CarryonError('replica-busy', `disk ${name} already has a frozen layer`);
      const next = otherTop(l.top);
      const base = await readBase(d.dir);
      // Made whole before the layout names it; a file left by a kill before that is simply made again.
      await createLayer({ ...d.chain(), files: chainFiles(d.dir, next) }, 'top', base.diskSize, base.chunkSize, templates);
      await writeLayout(d.dir, { v: 1, top: next, under: l.top, mergingTo: null });
      return join(d.dir, next);
    },
    async acknowledged(acked) {
      for (const d of disks) {
        const digest = acked.get(d.name);
        if (digest) await writeLayout(d.dir, { ...readLayout(d.dir), mergingTo: digest });
      }
    },
    async folded(name) {
      const d = disk(name);
      const l = readLayout(d.dir);
      if (!l.under || !l.mergingTo) throw new Error(`disk ${name} has nothing being folded`);
      await recordBase(d.dir, await nextManifest(d.dir), l.mergingTo);
      digests.set(name, l.mergingTo);
      await writeLayout(d.dir, { v: 1, top: l.top, under: null, mergingTo: null });
      await rm(join(d.dir, l.under), { force: true });
    },
    async abandoned(name) {
      const d = disk(name);
      const l = readLayout(d.dir);
      if (!l.under) throw new Error(`disk ${name} has no frozen layer`);
      await writeLayout(d.dir, { v: 1, top: l.under, under: null, mergingTo: null });
      await rm(join(d.dir, l.top), { force: true });
    },
    async frozenExtents(name) {
      const d = disk(name);
      const l = readLayout(d.dir);
      if (!l.under) throw new Error(`disk ${name} has no frozen layer`);
      return topExtents(frozenChain(d.chain(), d.dir, l.under));
    },
  };
}

/** A running guest's live chain: made once per QEMU (its node names move with every point). */
export function liveChainOf(vm: RunningDesktop, disks: ReplicaDisk[], socketDir: string, templates: string): LiveChain {
  return new LiveChain({ qmp: vm.connection }, hostLayers(disks, templates), vmReplicaServer((c, a) => vm.qmp(c, a), join(socketDir, 'replica.sock')));
}

export interface ReplicaBegun {
  job: { id: string };
  snapshotId: string;
  disks: { name: string; digest: string }[];
  keys: LineageKeys;
}

/**
 * One background replica of a running guest (issue 26 item 6): the broker opens the upload, the
 * chain freezes (the guest writes on above), the frozen layer's pages travel as a handover's do,
 * the broker commits the restore point, and the frozen layer folds into the base, which then
 * holds it. Anything failing before the commit abandons the point: the writes go back into the
 * top, nothing lost, and the broker is told.
 */
export async function replicate(o: {
  live: LiveChain;
  disks: ReplicaDisk[];
  begin: () => Promise<ReplicaBegun>;
  endpoint: (jobId: string) => Promise<TransferEndpoint>;
  renew: (jobId: string) => () => Promise<TransferEndpoint>;
  commit: (jobId: string, disks: { name: string; changes: (string | number | null)[][] }[]) => Promise<{ snapshotId: string }>;
  abandon: (jobId: string, message: string) => Promise<unknown>;
  /** Tests: runs once the pages are up, before the commit (a check-out that comes meanwhile). */
  beforeCommit?: () => Promise<void>;
}): Promise<{ snapshotId: string; changedChunks: number; chunksMoved: number; bytesMoved: number }> {
  const b = await o.begin();
  const bases = new Map<string, Manifest>();
  try {
    for (const d of b.disks) {
      const local = o.disks.find((x) => x.name === d.name);
      const base = local ? await readBase(local.dir) : null;
      // Pages are sent against the base: it must be the snapshot the broker names.
      if (!base || manifestDigest(base) !== d.digest) throw new CarryonError('host-chain-diverged', `disk ${d.name} here holds another snapshot than the one the broker names`);
      bases.set(d.name, base);
    }
  } catch (err) {
    await o.abandon(b.job.id, (err as Error).message).catch(() => undefined);
    throw err;
  }
  let committed: { snapshotId: string } | null = null;
  const point = await o.live.freeze().catch(async (err: unknown) => {
    await o.abandon(b.job.id, (err as Error).message).catch(() => undefined);
    throw err;
  });
  const clients: NbdClient[] = [];
  try {
    const readers = [];
    for (const d of point.disks) {
      const top = await NbdClient.connect(point.socketPath, d.exportName);
      clients.push(top);
      readers.push({ disk: { name: d.name, base: bases.get(d.name)! }, top, extents: d.extents });
    }
    const sent = await sendPages({
      readers, endpoint: await o.endpoint(b.job.id), renew: o.renew(b.job.id), keys: b.keys,
      commit: async (disks) => {
        await o.beforeCommit?.();
        committed = await o.commit(b.job.id, disks);
      },
    });
    for (const c of clients.splice(0)) await c.close();
    // What the base holds once folded: its manifest with the changes applied (the broker's, computed the same way).
    const digests = new Map<string, string>();
    for (const d of o.disks) {
      const base = bases.get(d.name)!;
      const chunks = base.chunks.slice();
      for (const [index, id] of sent.changes.find((c) => c.name === d.name)?.changes ?? []) chunks[index] = id;
      const next = { chunkSize: base.chunkSize, diskSize: base.diskSize, chunks };
      await writeFileAtomic(join(d.dir, 'next.manifest'), encodeManifest(next));
      digests.set(d.name, manifestDigest(next));
    }
    // Acknowledged: a failure from here on is settled by the next open (layout.ts), never abandoned.
    await o.live.fold(point.id, digests);
    return { snapshotId: (committed as { snapshotId: string } | null)!.snapshotId, changedChunks: sent.changedChunks, chunksMoved: sent.chunksMoved, bytesMoved: sent.bytesMoved };
  } catch (err) {
    for (const c of clients) await c.close().catch(() => undefined);
    if (!committed) {
      // The broker first (its job ends even where QEMU is gone); a chain QEMU no longer holds is settled at the next start.
      await o.abandon(b.job.id, (err as Error).message).catch(() => undefined);
      await o.live.abandon(point.id);
    }
    throw err;
  }
}
