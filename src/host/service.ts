import { mkdir, readdir, readFile, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { request } from 'undici';
import { z } from 'zod';
import { BrokerClient, JobView } from '../net/broker-client.js';
import { CarryonError } from '../core/errors.js';
import { decodeLineageKeys } from '../core/keys.js';
import { decodeManifest, encodedDigest, manifestDigest } from '../core/chunks/manifest.js';
import { freeDiskBytes } from '../hypervisor/host.js';
import type { RunningDesktop } from '../hypervisor/launch.js';
import { pinnedAgent } from '../net/pinned-agent.js';
import { parseHostCredential } from '../net/host-credential.js';
import { TransferSession } from '../transfer-client/client.js';
import { dialDisplay } from './display.js';
import { sendBack } from './send-back.js';
import { discardTops, fillBases, hasCompleteBase, hasTop, readyBase, readyTops, type HostDisk } from './disks.js';
import { forceOff, startGuest, vncSocketPath } from './guest.js';
import { hostChain, hostDiskDir, hostSocketDir, loadOrCreateHostKey } from './keys.js';
import { hasPendingCommit, liveChainOf, replicate, settleCommit, settleReplica, type ReplicaCommit, type ReplicaDisk } from './replica.js';
import type { LiveChain } from '../live/live-chain.js';

export interface HostOptions {
  id: string;
  brokerUrl: string;
  brokerFingerprint: string;
  /** Its own credential (`carryon admin hosts add ID`), which names `id`. */
  secret: string;
  dataDir: string;
  vcpus: number;
  ramMiB: number;
  maxDesktops: number;
  accel: 'kvm' | 'tcg';
  heartbeatSec?: number;
  /** ACPI shutdown's wait before the guest is powered off by force. */
  shutdownGraceSec?: number;
  /** Seconds between background replicas of each running desktop (replica.ts), over the desktop's policy `replicationIntervalMin`; 0: none. */
  replicateSec?: number;
  /** Guests start with their CPUs stopped (tests). */
  pausedGuests?: boolean;
  log?: (line: string) => void;
}

const Command = z.object({ id: z.string(), type: z.enum(['start', 'off', 'shutdown', 'reset', 'discard', 'display', 'handover']), desktopId: z.string(), token: z.string().optional() });
type Command = z.infer<typeof Command>;
const Committed = z.object({ snapshotId: z.string(), disks: z.array(z.object({ name: z.string(), digest: z.string() })).optional() });
const Handover = z.object({ job: JobView, keys: z.string(), disks: z.array(z.object({ name: z.string().regex(/^[A-Za-z0-9._-]{1,64}$/), digest: z.string() })).min(1).max(16) });
const Prepared = z.object({
  desktop: z.object({ id: z.string(), name: z.string(), config: z.object({ vcpus: z.number().int().min(1), ramMiB: z.number().int().min(64), nic: z.enum(['user', 'none']) }) }),
  snapshotId: z.string(),
  keys: z.string(),
  disks: z.array(z.object({ name: z.string().regex(/^[A-Za-z0-9._-]{1,64}$/), digest: z.string(), manifest: z.string() })).min(1).max(16),
  job: JobView,
  replicateEveryMin: z.number().int().min(0).default(0),
});

interface Local {
  state: 'starting' | 'running' | 'stopping' | 'stopped';
  vm?: RunningDesktop;
  /** The guest's disks in its order (d0, d1, …) and, once a replica was taken, its live chain. */
  disks?: ReplicaDisk[];
  live?: LiveChain;
  /** Milliseconds between its background replicas (0: none), and when the last one (or the start) was. */
  replicateMs?: number;
  lastReplicaAt?: number;
  /** A frozen point whose commit answer was lost (replica.ts settleCommit): settled at the next contact. */
  pendingPoint?: string;
  detail?: string;
}

/** Tests: a check-out before the commit; the commit's request itself (to lose its answer, or never send it). */
export interface ReplicaHooks {
  beforeCommit?: () => Promise<void>;
  commitVia?: <T>(send: () => Promise<T>) => Promise<T>;
}

export interface RunningHost {
  id: string;
  /** One heartbeat now (and the commands it brings, started in the background). */
  heartbeat(): Promise<void>;
  /** Settles once every command taken so far has been carried out and acknowledged. */
  idle(): Promise<void>;
  /** Display connections open now (broker ↔ a guest's VNC). */
  openDisplays(): number;
  /** One background replica of a running desktop now (what the timer does every `replicateSec`). */
  replicate(desktopId: string, hooks?: ReplicaHooks): Promise<string>;
  /** Powers its guests off (forced), tells the broker, and stops. */
  close(): Promise<void>;
}

/**
 * The host id a credential (`carryon admin hosts add ID`) names; `id`, when given, must be it.
 * The broker's old shared `host.secret` is refused here with what to do instead.
 */
export function credentialHostId(credential: string, id?: string): string {
  const c = parseHostCredential(credential);
  if (!c) throw new CarryonError('bad-secret', "the secret file does not hold a host's own credential (the broker's shared host.secret is no longer accepted): on the broker's side, `carryon admin hosts add <host id>` makes one for this host");
  if (id !== undefined && id !== c.hostId) throw new CarryonError('invalid', `--id ${id}, but the credential is host ${c.hostId}'s`);
  return c.hostId;
}

/**
 * A desktop host: registers with the broker, heartbeats (capacity, what runs, which bases it
 * keeps) and carries out the commands the heartbeat's answer brings. It only ever calls the
 * broker (pinned TLS, its own credential); the broker never needs to reach it.
 */
export async function startHost(o: HostOptions): Promise<RunningHost> {
  const log = o.log ?? (() => undefined);
  credentialHostId(o.secret, o.id);
  await mkdir(o.dataDir, { recursive: true, mode: 0o700 });
  const hostKey = await loadOrCreateHostKey(o.dataDir);
  await mkdir(join(o.dataDir, 'replica-commits'), { recursive: true, mode: 0o700 });
  const templates = process.env.CARRYON_TEMPLATE_DIR || join(o.dataDir, 'templates');
  const broker = new BrokerClient(o.brokerUrl, o.brokerFingerprint);
  const headers = { 'x-carryon-host-secret': o.secret };
  const heartbeatSec = o.heartbeatSec ?? 5;
  const path = (rest: string) => `/v1/hosts/${encodeURIComponent(o.id)}${rest}`;
  const register = () => broker.call('POST', '/v1/hosts/register', { id: o.id, displayUrl: null, vcpus: o.vcpus, ramMiB: o.ramMiB, maxDesktops: o.maxDesktops, accel: o.accel, heartbeatSec }, z.object({ ok: z.boolean() }), headers);
  await register();

  const local = new Map<string, Local>();
  const taken = new Set<string>();
  /** Commands of one desktop run one after another; different desktops' in parallel. */
  const lanes = new Map<string, Promise<void>>();
  const diskNames = async (desktopId: string) => (await readdir(join(o.dataDir, 'desktops', desktopId)).catch(() => [] as string[])).filter((n) => /^[A-Za-z0-9._-]{1,64}$/.test(n));
  const chainsOf = async (desktopId: string) => (await diskNames(desktopId)).map((name) => ({ chain: hostChain(hostKey, o.dataDir, desktopId, name) }));

  const report = async () => {
    const bases: string[] = [];
    for (const id of await readdir(join(o.dataDir, 'desktops')).catch(() => [] as string[])) {
      const names = await diskNames(id);
      if (names.length && (await Promise.all(names.map((n) => hasCompleteBase(hostDiskDir(o.dataDir, id, n))))).every(Boolean)) bases.push(id);
    }
    return {
      desktops: [...local].map(([desktopId, l]) => ({ desktopId, state: l.state, ...(l.vm ? { pid: l.vm.pid } : {}), ...(l.detail ? { detail: l.detail.slice(0, 500) } : {}) })),
      bases,
      freeDiskBytes: await freeDiskBytes(o.dataDir),
    };
  };

  /** A job's ticket, renewed for this host (its own jobs only). */
  const renewer = (jobId: string) => async () => {
    const j = await broker.call('GET', path(`/jobs/${encodeURIComponent(jobId)}`), undefined, JobView, headers);
    if (!j.transfer) throw new CarryonError(j.state === 'queued' ? 'queued' : 'job-ended', `job ${jobId} is ${j.state}${j.queuePosition ? ` (queue position ${j.queuePosition})` : ''}`);
    return j.transfer;
  };
  /** Queued behind other transfers: wait for a slot (bounded), as a laptop's check-out does. */
  const endpointOf = async (job: JobView) => {
    let endpoint = job.transfer;
    for (let i = 0; !endpoint; i++) {
      await new Promise((r) => setTimeout(r, 1000));
      endpoint = await renewer(job.id)().catch((err: CarryonError) => (err.code === 'queued' && i < 300 ? undefined : Promise.reject(err)));
    }
    return endpoint;
  };

  const start = async (desktopId: string): Promise<{ message: string }> => {
    const cur = local.get(desktopId);
    if (cur?.state === 'running') return { message: 'already running' };
    local.set(desktopId, { state: 'starting' });
    const p = await broker.call('POST', path(`/desktops/${encodeURIComponent(desktopId)}/prepare`), {}, Prepared, headers);
    await settleOffline(desktopId, p.disks.map((d) => d.name));
    const disks: HostDisk[] = p.disks.map((d) => {
      const raw = Buffer.from(d.manifest, 'base64');
      if (encodedDigest(raw) !== d.digest) throw new CarryonError('bad-manifest', `manifest of ${d.name} does not match its digest`);
      const manifest = decodeManifest(raw);
      return { name: d.name, dir: hostDiskDir(o.dataDir, desktopId, d.name), chain: hostChain(hostKey, o.dataDir, desktopId, d.name), manifest, digest: d.digest };
    });
    const needs = [];
    for (const d of disks) if (await readyBase(d, templates)) needs.push(d);
    let moved = { bytesMoved: 0, chunksMoved: 0 };
    if (needs.length) {
      const endpoint = await endpointOf(p.job);
      const session = new TransferSession(endpoint, renewer(p.job.id));
      try {
        moved = await fillBases(needs, session, decodeLineageKeys(p.keys));
      } finally {
        await session.close();
      }
    }
    await readyTops(disks, templates);
    const vm = await startGuest({ desktopId, config: p.desktop.config, disks, accel: o.accel, socketDir: await hostSocketDir(o.dataDir, desktopId), paused: o.pausedGuests });
    const replicateMs = (o.replicateSec ?? p.replicateEveryMin * 60) * 1000;
    const entry: Local = { state: 'running', vm, disks: replicaDisks(desktopId, disks.map((d) => d.name)), replicateMs, lastReplicaAt: Date.now() };
    local.set(desktopId, entry);
    // A guest that powers itself off (or a QEMU that dies) is reported stopped at the next heartbeat.
    void vm.exited.then((code) => {
      if (local.get(desktopId) === entry) local.set(desktopId, { state: 'stopped', detail: `QEMU exited with code ${code}` });
    });
    log(`started ${p.desktop.name} (snapshot ${p.snapshotId}): ${moved.chunksMoved} chunks / ${moved.bytesMoved} bytes pulled, QEMU pid ${vm.pid}`);
    return { message: `running (pid ${vm.pid}, ${o.accel}); ${moved.chunksMoved} chunks / ${moved.bytesMoved} bytes pulled for snapshot ${p.snapshotId}` };
  };

  const stop = async (desktopId: string, how: 'off' | 'shutdown'): Promise<{ message: string; forced: boolean }> => {
    const cur = local.get(desktopId);
    if (!cur?.vm || cur.state !== 'running') return { message: 'not running here', forced: false };
    const vm = cur.vm;
    local.set(desktopId, { state: 'stopping', vm });
    let forced = how === 'off';
    let code: number;
    if (how === 'off') code = await forceOff(vm);
    else {
      // ACPI first; after the grace the guest is powered off (and the answer says so).
      const grace = (o.shutdownGraceSec ?? 60) * 1000;
      await vm.qmp('system_powerdown').catch(() => undefined);
      const r = await Promise.race([vm.exited, new Promise<null>((res) => setTimeout(() => res(null), grace).unref())]);
      if (r === null) forced = true;
      code = r ?? (await forceOff(vm));
    }
    local.set(desktopId, { state: 'stopped', detail: `${forced ? 'powered off' : 'shut down'} (QEMU exit ${code})` });
    return { forced, message: how === 'off' ? `powered off (QEMU exit ${code})` : forced ? `the guest did not shut down within ${o.shutdownGraceSec ?? 60} s: powered off (QEMU exit ${code})` : `shut down (QEMU exit ${code})` };
  };

  /**
   * A check-out of this desktop (broker hosts/handover.ts): ask first (a check-out cancelled
   * meanwhile leaves the guest running), shut the guest down (ACPI, forced after the grace), send
   * back the pages it wrote, and once the broker committed them drop the top (the base stays: the
   * next start pulls only what changed). Any failure keeps the top here.
   */
  const handOver = async (desktopId: string): Promise<{ message: string }> => {
    const enc = encodeURIComponent(desktopId);
    const b = await broker.call('POST', path(`/desktops/${enc}/handover`), {}, Handover, headers);
    const t0 = Date.now();
    const down = local.get(desktopId)?.state === 'running' ? await stop(desktopId, 'shutdown') : { message: 'the guest was not running', forced: false };
    log(`handover ${desktopId}: ${down.message} after ${((Date.now() - t0) / 1000).toFixed(2)} s`);
    await broker.call('POST', path(`/desktops/${enc}/handover/shutdown`), down, z.object({ ok: z.boolean() }), headers);
    await settleOffline(desktopId, b.disks.map((d) => d.name));
    const disks = [];
    for (const d of b.disks) {
      const dir = hostDiskDir(o.dataDir, desktopId, d.name);
      const base = decodeManifest(await readFile(join(dir, 'base.manifest')));
      // The broker's base and ours must be the same snapshot: pages are sent against it.
      if (manifestDigest(base) !== d.digest) throw new CarryonError('host-chain-diverged', `disk ${d.name} here holds another snapshot than the one the broker names`);
      disks.push({ name: d.name, chain: hostChain(hostKey, o.dataDir, desktopId, d.name), base });
    }
    const endpoint = await endpointOf(b.job);
    const sent = await sendBack({
      disks, socketDir: await hostSocketDir(o.dataDir, desktopId), endpoint, renew: renewer(b.job.id), keys: decodeLineageKeys(b.keys),
      commit: (changes) => broker.call('POST', path(`/desktops/${enc}/handover/commit`), { disks: changes }, z.object({ snapshotId: z.string() }), headers),
    });
    await discardTops(disks);
    local.delete(desktopId);
    return { message: `${down.message}; ${sent.changedChunks} chunks changed, ${sent.chunksMoved} sent (${sent.bytesMoved} bytes)` };
  };

  const replicaDisks = (desktopId: string, names: string[]): ReplicaDisk[] =>
    names.map((name) => ({ name, dir: hostDiskDir(o.dataDir, desktopId, name), chain: () => hostChain(hostKey, o.dataDir, desktopId, name) }));
  const pendingFile = (desktopId: string) => join(o.dataDir, 'replica-commits', `${encodeURIComponent(desktopId)}.json`);
  const commitCall = (desktopId: string): ReplicaCommit => (jobId, disks) =>
    broker.call('POST', path(`/desktops/${encodeURIComponent(desktopId)}/replica/commit`), { jobId, disks }, Committed, headers);
  const abandonCall = (desktopId: string) => (jobId: string, message: string) =>
    broker.call('POST', path(`/desktops/${encodeURIComponent(desktopId)}/replica/abandon`), { jobId, message: message.slice(0, 2000) }, z.object({ ok: z.boolean() }), headers);
  /**
   * Before a stopped guest's chain is opened or sent (a start, a handover): a replica commit whose
   * answer was lost is asked again (folded if it was committed), then an open point is settled.
   */
  const settleOffline = async (desktopId: string, names: string[]) => {
    const disks = replicaDisks(desktopId, names);
    const r = await settleCommit({ file: pendingFile(desktopId), disks, commit: commitCall(desktopId), abandon: abandonCall(desktopId) });
    if (r) log(`${desktopId}: the replica commit whose answer was lost was ${r === 'committed' ? 'committed: folded into the base' : 'not committed: its writes go back into the top'}`);
    await settleReplica(disks);
  };

  /** A background replica (replica.ts): in the desktop's lane, so never beside a handover or a stop. */
  const replicateNow = async (desktopId: string, hooks: ReplicaHooks = {}): Promise<string> => {
    const cur = local.get(desktopId);
    if (!cur?.vm || cur.state !== 'running' || !cur.disks) throw new CarryonError('not-running', `${desktopId} is not running on this host`);
    cur.live ??= liveChainOf(cur.vm, cur.disks, await hostSocketDir(o.dataDir, desktopId), templates);
    const enc = encodeURIComponent(desktopId);
    // The last replica's commit went unanswered: this contact settles it first (the guest runs on, its point frozen).
    if (cur.pendingPoint) {
      const settled = await settleCommit({ file: pendingFile(desktopId), disks: cur.disks, commit: commitCall(desktopId), abandon: abandonCall(desktopId), point: { live: cur.live, id: cur.pendingPoint } });
      cur.pendingPoint = undefined;
      if (settled === 'committed') {
        const line = `the last replica's commit, asked again, is committed (whether the first or this one reached the broker): folded into the base, now the broker's snapshot (digest ${(JSON.parse(await readFile(join(cur.disks[0]!.dir, 'base.json'), 'utf8')) as { digest: string }).digest.slice(0, 12)}…)`;
        log(`${desktopId}: ${line}`);
        return line;
      }
      log(`${desktopId}: the last replica was not committed: its writes are back in the top, replicated now`);
    } else if (hasPendingCommit(pendingFile(desktopId))) throw new CarryonError('commit-unknown', `a replica commit of ${desktopId} is pending without its frozen point in this process: stop and start the desktop to settle it`);
    const Begun = z.object({ job: JobView, snapshotId: z.string(), keys: z.string(), disks: z.array(z.object({ name: z.string(), digest: z.string() })) });
    const send = commitCall(desktopId);
    const r = await replicate({
      live: cur.live, disks: cur.disks, pendingFile: pendingFile(desktopId), beforeCommit: hooks.beforeCommit,
      begin: async () => {
        const b = await broker.call('POST', path(`/desktops/${enc}/replica`), {}, Begun, headers);
        jobs.set(b.job.id, b.job);
        return { ...b, keys: decodeLineageKeys(b.keys) };
      },
      endpoint: (jobId) => endpointOf(jobs.get(jobId)!),
      renew: renewer,
      commit: (jobId, disks) => (hooks.commitVia ? hooks.commitVia(() => send(jobId, disks)) : send(jobId, disks)),
      abandon: abandonCall(desktopId),
    }).catch((err: Error & { pendingPoint?: string }) => {
      if (err.pendingPoint) cur.pendingPoint = err.pendingPoint;
      throw err;
    });
    const line = `replica ${r.snapshotId}: ${r.changedChunks} chunks changed, ${r.chunksMoved} sent (${r.bytesMoved} bytes)`;
    log(`${desktopId}: ${line}`);
    return line;
  };
  const jobs = new Map<string, JobView>();
  const inLane = <T>(desktopId: string, fn: () => Promise<T>): Promise<T> => {
    const run = (lanes.get(desktopId) ?? Promise.resolve()).then(fn);
    lanes.set(desktopId, run.then(() => undefined, () => undefined));
    return run;
  };
  const replicating = new Set<string>();
  // Checked every few seconds; each desktop is replicated once its interval since the last one (or its start) has passed.
  const replicaTimer = o.replicateSec === 0 ? null : setInterval(() => {
    for (const [id, l] of local) {
      // A commit whose answer was lost is asked again at the next tick, not after a whole interval.
      if (l.state !== 'running' || !l.replicateMs || replicating.has(id) || (!l.pendingPoint && Date.now() - (l.lastReplicaAt ?? 0) < l.replicateMs)) continue;
      replicating.add(id);
      void inLane(id, () => replicateNow(id)).catch((err: Error) => log(`replica of ${id} failed (nothing lost): ${err.message}`)).finally(() => {
        replicating.delete(id);
        l.lastReplicaAt = Date.now();
      });
    }
  }, Math.min(o.replicateSec ?? 10, 10) * 1000);

  const carryOut = async (c: Command): Promise<{ ok: boolean; message: string; kept?: boolean; guest?: 'running' | 'stopped' }> => {
    try {
      switch (c.type) {
        case 'start':
          return { ok: true, ...(await start(c.desktopId)) };
        case 'off':
        case 'shutdown':
          return { ok: true, ...(await stop(c.desktopId, c.type)) };
        case 'handover':
          return { ok: true, ...(await handOver(c.desktopId)) };
        case 'reset': {
          const cur = local.get(c.desktopId);
          if (!cur?.vm || cur.state !== 'running') return { ok: false, message: 'not running here' };
          await cur.vm.qmp('system_reset');
          return { ok: true, message: 'reset' };
        }
        case 'display': {
          // Its own lane: a screen opens while a long start of another desktop fills.
          const cur = local.get(c.desktopId);
          if (!cur?.vm || cur.state !== 'running') return { ok: false, message: 'the desktop is not running on this host' };
          if (!c.token) return { ok: false, message: 'the display command came without its token' };
          const d = await dialDisplay({ brokerUrl: o.brokerUrl, brokerFingerprint: o.brokerFingerprint, hostId: o.id, secret: o.secret, session: c.id, token: c.token, vncSocket: vncSocketPath(await hostSocketDir(o.dataDir, c.desktopId)) });
          displays.add(d);
          void d.closed.then(() => displays.delete(d));
          return { ok: true, message: 'display connected' };
        }
        case 'discard': {
          // An admin released the desktop (e.g. while this host was cut off and marked lost): a guest still running here is powered off first.
          const cur = local.get(c.desktopId);
          if (cur?.vm && cur.state !== 'stopped') await forceOff(cur.vm);
          // Its writes are discarded: a replica commit still pending is moot.
          await rm(pendingFile(c.desktopId), { force: true });
          await settleReplica(replicaDisks(c.desktopId, await diskNames(c.desktopId)));
          await discardTops(await chainsOf(c.desktopId));
          local.delete(c.desktopId);
          return { ok: true, message: `${cur?.vm && cur.state !== 'stopped' ? 'powered off; ' : ''}the guest's writes on this host are deleted; the base is kept` };
        }
      }
    } catch (err) {
      if (c.type === 'start') {
        const l = local.get(c.desktopId);
        if (l?.state === 'starting') local.delete(c.desktopId);
        return { ok: false, message: (err as Error).message, kept: hasTop(await chainsOf(c.desktopId)) };
      }
      // A handover that did not end: the guest stays as it is now, and so does its top.
      if (c.type === 'handover') return { ok: false, message: (err as Error).message, guest: local.get(c.desktopId)?.state === 'running' ? 'running' : 'stopped' };
      return { ok: false, message: (err as Error).message };
    }
  };

  const displays = new Set<{ close: () => void; closed: Promise<void> }>();
  /** Taken and not yet acknowledged: the long poll says it holds them (else it would be answered with them again at once). */
  const unacked = new Set<string>();
  const run = (c: Command) => {
    taken.add(c.id);
    unacked.add(c.id);
    const laneKey = c.type === 'display' ? `display:${c.id}` : c.desktopId;
    const lane = (c.type === 'display' ? Promise.resolve() : lanes.get(c.desktopId) ?? Promise.resolve()).then(async () => {
      log(`${c.type} ${c.desktopId}…`);
      const r = await carryOut(c);
      log(`${c.type} ${c.desktopId}: ${r.ok ? 'ok' : 'failed'}: ${r.message}`);
      // Told until the broker has heard it (a broker restart, a lost answer): the command stays pending there till then.
      for (let i = 0; ; i++) {
        try {
          await broker.call('POST', path(`/commands/${encodeURIComponent(c.id)}`), { ok: r.ok, message: r.message.slice(0, 2000), ...(r.kept === undefined ? {} : { kept: r.kept }), ...(r.guest ? { guest: r.guest } : {}) }, z.object({ ok: z.boolean() }), headers);
          unacked.delete(c.id);
          return;
        } catch (err) {
          if ((err as { status?: number }).status === 404) unacked.delete(c.id);
          if ((err as { status?: number }).status === 404 || i >= 20) return void log(`could not report ${c.type} ${c.desktopId}: ${(err as Error).message}`);
          await new Promise((r2) => setTimeout(r2, 1000));
        }
      }
    });
    lanes.set(laneKey, lane);
    if (c.type === 'display') void lane.then(() => lanes.delete(laneKey));
  };

  let beating: Promise<void> | null = null;
  const heartbeat = async () => {
    if (beating) return beating;
    beating = (async () => {
      const reply = await broker.call('POST', path('/heartbeat'), await report(), z.object({ commands: z.array(Command) }), headers);
      for (const c of reply.commands) if (!taken.has(c.id)) run(c);
    })().finally(() => (beating = null));
    return beating;
  };
  await heartbeat();
  const timer = setInterval(() => {
    heartbeat().catch((err: Error) => {
      log(`heartbeat failed: ${err.message}`);
      // The broker forgot us (its database was replaced): register again.
      if ((err as { status?: number }).status === 404) register().catch(() => undefined);
    });
  }, heartbeatSec * 1000);
  // Not unref'd: the heartbeat is what keeps a host process alive (it has no listening socket); close() ends it.

  // A long poll beside the heartbeat: a command (a browser waiting for a screen, a power operation) is answered at once, not at the next beat.
  const waitAgent = pinnedAgent(o.brokerFingerprint, { connections: 1 });
  const stopWaiting = new AbortController();
  const waitForCommands = async () => {
    while (!stopWaiting.signal.aborted) {
      try {
        const known = [...unacked].slice(-1000);
        const res = await request(`${o.brokerUrl.replace(/\/$/, '')}${path('/commands/wait')}`, { method: 'POST', dispatcher: waitAgent, signal: stopWaiting.signal, headers: { ...headers, 'content-type': 'application/json' }, body: JSON.stringify({ known }) });
        const body = await res.body.json();
        if (res.statusCode !== 200) throw new CarryonError('display-wait', `HTTP ${res.statusCode}`);
        for (const c of z.object({ commands: z.array(Command) }).parse(body).commands) if (!taken.has(c.id)) run(c);
      } catch (err) {
        if (stopWaiting.signal.aborted) break;
        log(`waiting for commands failed: ${(err as Error).message}`);
        await new Promise((r) => setTimeout(r, heartbeatSec * 1000));
      }
    }
  };
  const waiting = waitForCommands();

  return {
    id: o.id,
    heartbeat,
    idle: async () => void (await Promise.all([...lanes.values()])),
    replicate: (desktopId, hooks) => inLane(desktopId, () => replicateNow(desktopId, hooks)),
    openDisplays: () => displays.size,
    close: async () => {
      clearInterval(timer);
      if (replicaTimer) clearInterval(replicaTimer);
      stopWaiting.abort();
      await waiting;
      await waitAgent.destroy();
      for (const d of displays) d.close();
      await Promise.all([...displays].map((d) => d.closed));
      await Promise.allSettled([...lanes.values()]);
      for (const [id, l] of local) {
        if (l.vm && l.state !== 'stopped') {
          await forceOff(l.vm);
          local.set(id, { state: 'stopped', detail: 'the host stopped' });
        }
      }
      await heartbeat().catch(() => undefined);
      // Said goodbye: the broker shows it retired, not lost.
      await broker.call('POST', path('/retire'), {}, z.object({ ok: z.boolean() }), headers).catch(() => undefined);
      await broker.close();
    },
  };
}
