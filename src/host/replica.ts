import { existsSync, readFileSync } from 'node:fs';
import { readFile, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { z } from 'zod';
import { CarryonError } from '../core/errors.js';
import { BrokerError } from '../net/broker-client.js';
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

type CommitDisks = { name: string; changes: (string | number | null)[][] }[];
export type ReplicaCommit = (jobId: string, disks: CommitDisks) => Promise<{ snapshotId: string; disks?: { name: string; digest: string }[] }>;

/**
 * A commit sent whose answer never came (the broker may have applied it), kept on disk beside the
 * frozen point until the broker says: what was sent (the same body goes again) and the digests the
 * frozen layer folds to.
 */
const PendingCommit = z.object({
  v: z.literal(1), jobId: z.string(),
  disks: z.array(z.object({ name: z.string(), changes: z.array(z.array(z.union([z.string(), z.number(), z.null()]))) })),
  digests: z.record(z.string(), z.string()),
});
type PendingCommit = z.infer<typeof PendingCommit>;

async function readPending(file: string): Promise<PendingCommit | null> {
  try {
    return PendingCommit.parse(JSON.parse(await readFile(file, 'utf8')));
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return null;
    throw err;
  }
}
export const hasPendingCommit = (file: string) => existsSync(file);

/** Only a broker's own refusal (4xx) says a commit was not applied; anything else (no answer, a 5xx) may have been. */
const refused = (err: unknown) => err instanceof BrokerError && err.status >= 400 && err.status < 500;

/** The broker's snapshot must be what the host computed (the same changes on the same base), else nothing folds. */
function sameDigests(answer: { disks?: { name: string; digest: string }[] }, digests: Record<string, string>): boolean {
  return !answer.disks || (answer.disks.length === Object.keys(digests).length && answer.disks.every((d) => digests[d.name] === d.digest));
}

/**
 * Settles a replica whose commit answer was lost, at the host's next contact (issue 26; the
 * laptop's is client/ops/commit.ts): the same commit goes again. The broker answers the snapshot
 * the job made (committed the first time, or now): the frozen layer folds as if the answer had
 * come (live: `point` of the running guest; else offline, by the layout's `mergingTo`, which
 * `settleReplica` then folds). The broker refuses it (its job ended: it never committed): the
 * point is abandoned (live), or left for `settleReplica` to put back into the top. Nothing is lost
 * either way; no answer again keeps it pending (thrown). Null: nothing was pending.
 */
export async function settleCommit(o: { file: string; disks: ReplicaDisk[]; commit: ReplicaCommit; abandon: (jobId: string, message: string) => Promise<unknown>; point?: { live: LiveChain; id: string } }): Promise<'committed' | 'refused' | null> {
  const p = await readPending(o.file);
  if (!p) return null;
  let answer: Awaited<ReturnType<ReplicaCommit>>;
  try {
    answer = await o.commit(p.jobId, p.disks);
  } catch (err) {
    if (!refused(err)) throw new CarryonError('commit-unknown', `the replica commit of job ${p.jobId} is still unanswered (kept frozen, asked again at the next contact): ${(err as Error).message}`);
    // Never committed: its upload job ends (its slot back), and the writes go back into the top.
    await o.abandon(p.jobId, `not committed: ${(err as Error).message}`).catch(() => undefined);
    if (o.point) await o.point.live.abandon(o.point.id);
    await rm(o.file, { force: true });
    return 'refused';
  }
  if (!sameDigests(answer, p.digests)) {
    if (o.point) await o.point.live.abandon(o.point.id);
    await rm(o.file, { force: true });
    throw new CarryonError('host-chain-diverged', `the broker recorded replica ${answer.snapshotId} with other disks than this host sent: the writes stay in the top here`);
  }
  const digests = new Map(Object.entries(p.digests));
  if (o.point) await o.point.live.fold(o.point.id, digests);
  else for (const d of o.disks) if (readLayout(d.dir).under && digests.has(d.name)) await writeLayout(d.dir, { ...readLayout(d.dir), mergingTo: digests.get(d.name)! });
  await rm(o.file, { force: true });
  return 'committed';
}

/**
 * One background replica of a running guest (issue 26 item 6): the broker opens the upload, the
 * chain freezes (the guest writes on above), the frozen layer's pages travel as a handover's do,
 * the broker commits the restore point, and the frozen layer folds into the base, which then
 * holds it. Anything failing before the commit is sent abandons the point: the writes go back
 * into the top, nothing lost, and the broker is told. A commit sent but not answered keeps the
 * point frozen and pending (`pendingFile`, `settleCommit`): the throw carries `pendingPoint`.
 */
export async function replicate(o: {
  live: LiveChain;
  disks: ReplicaDisk[];
  pendingFile: string;
  begin: () => Promise<ReplicaBegun>;
  endpoint: (jobId: string) => Promise<TransferEndpoint>;
  renew: (jobId: string) => () => Promise<TransferEndpoint>;
  commit: ReplicaCommit;
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
  /** Sent, with no answer: the point stays frozen until `settleCommit`. */
  let unanswered = false;
  const point = await o.live.freeze().catch(async (err: unknown) => {
    await o.abandon(b.job.id, (err as Error).message).catch(() => undefined);
    throw err;
  });
  const clients: NbdClient[] = [];
  const digests = new Map<string, string>();
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
        // What the base holds once folded: its manifest with the changes applied (the broker's, computed the same way), on disk before the commit is sent.
        for (const d of o.disks) {
          const base = bases.get(d.name)!;
          const chunks = base.chunks.slice();
          for (const [index, id] of disks.find((c) => c.name === d.name)?.changes ?? []) chunks[index as number] = (id as string | null);
          const next = { chunkSize: base.chunkSize, diskSize: base.diskSize, chunks };
          await writeFileAtomic(join(d.dir, 'next.manifest'), encodeManifest(next));
          digests.set(d.name, manifestDigest(next));
        }
        await writeFileAtomic(o.pendingFile, JSON.stringify({ v: 1, jobId: b.job.id, disks, digests: Object.fromEntries(digests) } satisfies PendingCommit));
        let answer: Awaited<ReturnType<ReplicaCommit>>;
        try {
          answer = await o.commit(b.job.id, disks);
        } catch (err) {
          unanswered = !refused(err);
          throw err;
        }
        await rm(o.pendingFile, { force: true });
        if (!sameDigests(answer, Object.fromEntries(digests))) throw new CarryonError('host-chain-diverged', `the broker recorded replica ${answer.snapshotId} with other disks than this host sent`);
        committed = answer;
      },
    });
    for (const c of clients.splice(0)) await c.close();
    // Acknowledged: a failure from here on is settled by the next open (layout.ts), never abandoned.
    await o.live.fold(point.id, digests);
    return { snapshotId: (committed as { snapshotId: string } | null)!.snapshotId, changedChunks: sent.changedChunks, chunksMoved: sent.chunksMoved, bytesMoved: sent.bytesMoved };
  } catch (err) {
    for (const c of clients) await c.close().catch(() => undefined);
    if (unanswered) {
      throw Object.assign(new CarryonError('commit-unknown', `the broker's answer to the replica commit was lost (${(err as Error).message}): the point stays frozen and the commit is asked again at the next contact; nothing is lost`), { pendingPoint: point.id });
    }
    if (!committed) {
      await rm(o.pendingFile, { force: true });
      // The broker first (its job ends even where QEMU is gone); a chain QEMU no longer holds is settled at the next start.
      await o.abandon(b.job.id, (err as Error).message).catch(() => undefined);
      // What failed is the news (a QEMU that died fails this too): a point left open on disk is settled at the next start.
      await o.live.abandon(point.id).catch(() => undefined);
    }
    throw err;
  }
}
