import { spawn, type ChildProcess } from 'node:child_process';
import { readdir, readFile, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { availableParallelism } from 'node:os';
import { fileURLToPath } from 'node:url';
import { compress } from 'zstd-napi';
import { NODE_FLAGS } from '../src/core/runtime/node-flags.js';
import { checkout, upload, type ClientEnv } from '../src/client/ops.js';
import { serveDesktop } from '../src/client/ops/serve.js';
import { replicateInBackground } from '../src/client/background.js';
import { diskDir } from '../src/live/disks/disks.js';
import { Vault } from '../src/client/vault/vault.js';
import { PAGES_ZSTD_LEVEL } from '../src/core/chunks/delta.js';
import { chainBytesOnDisk, chainFiles, TOP_FILES } from '../src/disk/chain.js';
import { writeTestImage } from '../src/demo/image.js';
import { NbdClient } from '../src/nbd/client.js';
import { recordTrace, takeTrace, type TraceSpan } from '../src/files/trace.js';
import { writeData } from './checkin.js';
import { fioNbd } from './disk.js';
import { MB, settle, stats, timed } from './lib/measure.js';
import { Rig } from './lib/rig.js';
import type { BenchRow, BenchSection } from './types.js';

/**
 * Live replicas (issue 24, docs/architecture.md decision 56): the desktop is held by `carryon
 * serve` in a process of its own, as `carryon run` holds it, and this process takes replicas and
 * check-ins of it while it is held. A replica is only taken live when the holder is another
 * process, so the holder is test/support/serve-child (built into dist with the bench).
 */

const WRITE = 64 * 1024;
/** The broker's default chunk size (Rig.start passes none); the base's cluster size equals it. */
const CHUNK = 256 * 1024;
const SERVE_CHILD = fileURLToPath(new URL('../test/support/serve-child.js', import.meta.url));

interface Holder {
  uri: string;
  socket: string;
  /** SIGTERM and wait (serve closes its chain cleanly). */
  stop(): Promise<void>;
  /** Resolves when the child has exited (e.g. after a running check-in asked it to stop). */
  ended: Promise<number | null>;
}

/** `carryon serve DESKTOP` in a child process: the holder of the chain. */
export async function startHolder(env: ClientEnv, desktop: string): Promise<Holder> {
  const child: ChildProcess = spawn(process.execPath, [...NODE_FLAGS, SERVE_CHILD, env.home, env.user ?? 'bench', await env.password(), desktop], { stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  let err = '';
  child.stderr!.setEncoding('utf8').on('data', (d: string) => (err = (err + d).slice(-4000)));
  const ended = new Promise<number | null>((r) => child.once('close', (code) => r(code)));
  const socket = await new Promise<string>((resolve, reject) => {
    child.stdout!.setEncoding('utf8').on('data', (d: string) => {
      out += d;
      const line = out.split('\n').find((l) => l.endsWith('.sock'));
      if (line) resolve(line);
    });
    void ended.then((code) => reject(new Error(`serve child ended (${code}) before its socket was up:\n${err}`)));
  });
  return {
    socket,
    uri: `nbd+unix:///disk0?socket=${socket}`,
    ended,
    async stop() {
      if (child.exitCode === null && child.signalCode === null) child.kill('SIGTERM');
      const code = await ended;
      if (code !== 0) throw new Error(`serve child exited with ${code}:\n${err}`);
    },
  };
}

/**
 * `bytes` of typical-content 64 KiB writes at random aligned offsets through the holder's NBD
 * export, flushed. Returns what each written offset holds now (a later write to the same offset
 * replaces an earlier one: the data a replica has to carry).
 */
async function writeChange(socket: string, size: number, bytes: number, into: Map<number, Buffer>): Promise<void> {
  const c = await NbdClient.connect(socket, 'disk0');
  try {
    for (let i = 0; i < Math.round(bytes / WRITE); i++) {
      const off = Math.floor(Math.random() * (size / WRITE)) * WRITE;
      const data = writeData('typical');
      await c.write(off, data);
      into.set(off, data);
    }
    await c.flush();
  } finally {
    await c.close();
  }
}

/** The same change with the desktop stopped: served in this process only for the writes. */
async function changeStopped(env: ClientEnv, size: number, bytes: number): Promise<void> {
  const served = await serveDesktop(env, 'desk');
  try {
    await writeChange(served.socketPath, size, bytes, new Map());
  } finally {
    await served.close();
  }
}

/** The written data as the replica's pages blobs compress it (zstd at their level), never more than raw. */
function compressedSize(written: Map<number, Buffer>): number {
  let n = 0;
  for (const b of written.values()) n += Math.min(b.length, compress(b, { compressionLevel: PAGES_ZSTD_LEVEL }).length);
  return n;
}

/** In a 'mixed' test image the second half of every MiB is zeros: those chunks the check-out leaves unallocated in the base. */
const zeroChunkOf = (offset: number): number | null => (offset % 2 ** 20 >= 2 ** 19 ? Math.floor(offset / CHUNK) : null);

/** Base + every top file of disk0 that exists (a frozen layer left behind would count too). */
async function chainOnDisk(env: ClientEnv, desktop: string): Promise<{ base: number; top: number }> {
  const vault = await Vault.open(env.home);
  const state = await vault.find(desktop);
  const dir = diskDir(vault, state.desktopId, 'disk0');
  let top = 0;
  for (const t of TOP_FILES) top += (await chainBytesOnDisk(chainFiles(dir, t))).top;
  return { base: (await chainBytesOnDisk(chainFiles(dir))).base, top };
}

interface ReplicaRun {
  seconds: number;
  wire: number;
  compressed: number;
  /** Phases of this replica (CARRYON_TRACE=1 for the bench: the upload runs in this process). */
  spans: TraceSpan[];
}

/** Each phase's median over the runs (a phase met twice in a run counts its sum), small / big, in the order phases begin. */
function phasesSideBySide(small: ReplicaRun[], big: ReplicaRun[]): string {
  const perRun = (runs: ReplicaRun[]) => runs.map((r) => r.spans.reduce((m, sp) => m.set(sp.name, (m.get(sp.name) ?? 0) + sp.ms), new Map<string, number>()));
  const median = (runs: Map<string, number>[], name: string) => {
    const v = runs.map((m) => m.get(name) ?? 0).sort((a, b) => a - b);
    return v.length ? v[Math.floor(v.length / 2)]! : 0;
  };
  const [s, b] = [perRun(small), perRun(big)];
  const names = [...new Set([...small, ...big].flatMap((r) => [...r.spans].sort((x, y) => x.startMs - y.startMs).map((sp) => sp.name)))];
  return names.map((n) => `${n} ${median(s, n).toFixed(0)}/${median(b, n).toFixed(0)}`).join(', ');
}

/** One change of `changeBytes` through the holder, then a timed live replica; wire bytes from the transfer server. */
async function changeAndReplicate(rig: Rig, env: ClientEnv, holder: Holder, size: number, changeBytes: number, zeroChunks: Set<number>, pauses: number[]): Promise<ReplicaRun> {
  const written = new Map<number, Buffer>();
  await writeChange(holder.socket, size, changeBytes, written);
  for (const off of written.keys()) {
    const z = zeroChunkOf(off);
    if (z !== null) zeroChunks.add(z);
  }
  const before = (await rig.wire()).bytesIn;
  await settle();
  recordTrace(true);
  takeTrace();
  const { seconds, value } = await timed(() => upload(recordingPauses(env, pauses), 'desk', 'replicate')).finally(() => recordTrace(false));
  const spans = takeTrace();
  if (value.replicaKind === 'stopped') throw new Error('the replica was not taken live (the holder was not seen)');
  const wire = (await rig.wire()).bytesIn - before;
  return { seconds, wire, compressed: compressedSize(written), spans };
}

/** CPU seconds of a process's threads at nice 19. */
async function idleThreadsCpu(pid: number): Promise<number> {
  let sum = 0;
  for (const tid of await readdir(`/proc/${pid}/task`).catch(() => [] as string[])) {
    const stat = await readFile(`/proc/${pid}/task/${tid}/stat`, 'utf8').catch(() => '');
    const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    if (Number(f[16]) === 19) sum += (Number(f[11]) + Number(f[12])) / 100;
  }
  return sum;
}

/** CPU seconds used so far by this process and each of its descendants, by role (from /proc; 100 ticks a second). */
async function cpuByRole(): Promise<Map<string, number>> {
  const procs = new Map<number, { ppid: number; cpu: number; idle: number; role: string }>();
  for (const name of await readdir('/proc')) {
    if (!/^\d+$/.test(name)) continue;
    try {
      const stat = await readFile(`/proc/${name}/stat`, 'utf8');
      const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
      const cmd = (await readFile(`/proc/${name}/cmdline`, 'utf8')).split('\0');
      const role = cmd.some((a) => a.endsWith('serve-child.js')) ? 'holder (serve)' : cmd.some((a) => a.includes('qemu-storage-daemon')) ? 'holder (serve)'
        : cmd.includes('--background') ? 'background sender'
        : cmd.includes('transfer-server') ? 'transfer server' : cmd[0]?.endsWith('fio') ? 'fio' : 'bench (broker + sender)';
      // The transfer server's background replicas' lane (threads at nice 19, transfer/push-checks.ts) apart from the rest.
      const idle = role === 'transfer server' ? await idleThreadsCpu(Number(name)) : 0;
      procs.set(Number(name), { ppid: Number(f[1]), cpu: (Number(f[11]) + Number(f[12])) / 100 - idle, idle, role });
    } catch {
      // gone meanwhile
    }
  }
  const out = new Map<string, number>();
  const mine = (pid: number): boolean => pid === process.pid || (pid > 1 && procs.has(pid) && mine(procs.get(pid)!.ppid));
  // A storage daemon is its parent's: the holder's serves the guest, a sender's reads the frozen view for it.
  const roleOf = (p: { ppid: number; role: string }) => {
    const parent = procs.get(p.ppid);
    return p.role === 'holder (serve)' && parent && parent.role !== 'holder (serve)' ? parent.role : p.role;
  };
  for (const [pid, p] of procs) {
    if (!mine(pid)) continue;
    out.set(roleOf(p), (out.get(roleOf(p)) ?? 0) + p.cpu);
    if (p.role === 'transfer server') out.set('transfer server (idle lane)', (out.get('transfer server (idle lane)') ?? 0) + p.idle);
  }
  return out;
}

/** CPU seconds each role used while `fn` ran (processes that ended meanwhile are not counted). */
export async function cpuDuring<T>(fn: () => Promise<T>): Promise<{ value: T; cpu: string }> {
  const before = await cpuByRole();
  const value = await fn();
  const after = await cpuByRole();
  const cpu = [...after].map(([role, s]) => `${role} ${(s - (before.get(role) ?? 0)).toFixed(1)} s`).join(', ');
  return { value, cpu };
}

/** The env, with each live point in time's guest I/O pause (the sender's log line says it) collected in `into`. */
export function recordingPauses(env: ClientEnv, into: number[]): ClientEnv {
  return {
    ...env,
    log: (l) => {
      const m = /guest I\/O paused ([\d.]+) ms/.exec(l);
      if (m) into.push(Number(m[1]));
      env.log(l);
    },
  };
}

const pauseRange = (ms: number[]): string => (ms.length ? `median ${stats(ms).median.toFixed(1)} ms, max ${Math.max(...ms).toFixed(1)} ms (${ms.length})` : 'not seen');

interface Desk {
  gib: number;
  size: number;
  rig: Rig;
  env: ClientEnv;
  holder: Holder;
  baseAtCheckout: number;
  /** Zero chunks of the image that folded writes made non-zero (the base grows by a chunk for each). */
  zeroChunks: Set<number>;
  runs: ReplicaRun[];
  dir: string;
  image: string;
}

/** A broker with a `gib` GiB 'mixed' desktop (and clones), checked out to a laptop and held by a serve child. */
async function openDesk(work: string, gib: number, desktops: number): Promise<Desk> {
  const size = gib * 2 ** 30;
  const dir = join(work, `live-${gib}`);
  const image = join(work, `live-${gib}.raw`);
  await writeTestImage(image, size, 'mixed');
  const rig = await Rig.start(dir, image, undefined, { desktops });
  try {
    const env = await rig.laptop();
    await checkout(env, 'desk');
    const baseAtCheckout = (await chainOnDisk(env, 'desk')).base;
    const holder = await startHolder(env, 'desk');
    return { gib, size, rig, env, holder, baseAtCheckout, zeroChunks: new Set(), runs: [], dir, image };
  } catch (err) {
    await rig.close();
    throw err;
  }
}

/** Stops the holder if it still runs, the broker, and removes the files. */
async function closeDesk(d: Desk): Promise<void> {
  await d.holder.stop().catch(() => undefined);
  await d.rig.close();
  await rm(d.dir, { recursive: true, force: true, maxRetries: 5 });
  await rm(d.image, { force: true });
}

const nproc = availableParallelism();
const met = (ok: boolean) => (ok ? 'met' : 'MISSED');

/**
 * Replicas and check-in of a running desktop: `sizeGiB` and `bigGiB` desktops, the same change
 * (`changeGiB`, 1% of the smaller) before each replica; fio for `fioS` seconds per measurement.
 */
export function liveSection(work: string, sizeGiB: number, bigGiB: number, changeGiB: number, fioS: number): BenchSection {
  return {
    name: `Live replicas and check-in of a running desktop (held by carryon serve in another process), ${sizeGiB} and ${bigGiB} GiB`,
    async run() {
      const section = 'live';
      const rows: BenchRow[] = [];
      const change = changeGiB * 2 ** 30;
      const changeLabel = `${(change / 2 ** 20).toFixed(change < 10 * 2 ** 20 ? 1 : 0)} MiB`;
      const replicas = new Map<number, ReplicaRun[]>();
      const idlePauses: number[] = [];
      let chainRow: BenchRow | null = null;
      const fioRows: BenchRow[] = [];
      const offToCommit: number[] = [];
      const running: number[] = [];
      const stopped: number[] = [];
      // Both desktops are held at once and their replicas alternate, so the two sizes see the same load
      // (this box's other work moves replica times by tens of percent from minute to minute).
      const desks: Desk[] = [];
      try {
        for (const gib of [sizeGiB, bigGiB]) desks.push(await openDesk(work, gib, gib === sizeGiB ? 2 : 1));
        const [smallDesk, bigDesk] = desks as [Desk, Desk];
        for (let i = 0; i < 10; i++) {
          for (const d of i % 2 ? [bigDesk, smallDesk] : [smallDesk, bigDesk]) d.runs.push(await changeAndReplicate(d.rig, d.env, d.holder, d.size, change, d.zeroChunks, idlePauses));
        }
        for (const d of desks) replicas.set(d.gib, d.runs);
        await closeDesk(desks.pop()!);
        {
          // The rest on the smaller desktop only.
          const { rig, env, holder, size, baseAtCheckout, zeroChunks } = smallDesk;
          // The chain after 10 replicas and 1% more written since the last one.
          const since = new Map<number, Buffer>();
          await writeChange(holder.socket, size, change, since);
          const sinceBytes = [...since.values()].reduce((n, b) => n + b.length, 0);
          const chain = await chainOnDisk(env, 'desk');
          // What a check-out of the latest restore point would write: the first base, plus one whole chunk
          // (the base's cluster) for every zero chunk a folded write made non-zero.
          const restoreBase = baseAtCheckout + zeroChunks.size * CHUNK;
          const ratio = (chain.base + chain.top) / (restoreBase + sinceBytes);
          chainRow = { section, name: `laptop's chain on disk after 10 live replicas of ${changeLabel} of 64 KiB writes each, ${changeLabel} written since the last (${sizeGiB} GiB desktop)`,
            value: (chain.base + chain.top) / MB, unit: 'MB', runs: 1, spread: 0,
            peer: { name: 'base of the latest restore point + data written since', value: (restoreBase + sinceBytes) / MB, unit: 'MB' },
            note: `${ratio.toFixed(3)}× (target ≤ 1.10: ${met(ratio <= 1.1)}); base ${(chain.base / MB).toFixed(0)} MB, top ${(chain.top / MB).toFixed(1)} MB; the restore point's base: ${(baseAtCheckout / MB).toFixed(0)} MB at check-out + ${zeroChunks.size} chunks the writes made non-zero` };

          // Check-in of the running desktop (1% written since the last replica), three times; and,
          // as the peer, the same check-in after the desktop was stopped (what a user waited before).
          for (let i = 0; i < 3; i++) {
            const h = i === 0 ? holder : (smallDesk.holder = await startHolder(env, 'desk'));
            if (i > 0) {
              await writeChange(h.socket, size, change, new Map());
              await upload(env, 'desk', 'replicate');
              await writeChange(h.socket, size, change, new Map());
            }
            await settle();
            const { seconds, value } = await timed(() => upload(env, 'desk', 'checkin', { shutdownGraceMs: 30_000 }));
            const code = await h.ended;
            if (code !== 0) throw new Error(`the serve child exited with ${code} after the running check-in`);
            if (value.offToCommitSeconds === undefined) throw new Error('the check-in did not go the running way');
            offToCommit.push(value.offToCommitSeconds);
            running.push(seconds);
            // The peer: stopped desktop, same changes.
            await checkout(env, 'desk');
            await changeStopped(env, size, change);
            await upload(env, 'desk', 'replicate');
            await changeStopped(env, size, change);
            await settle();
            stopped.push((await timed(() => upload(env, 'desk', 'checkin'))).seconds);
            if (i < 2) await checkout(env, 'desk');
          }

          // fio through the held clone, without and with replicas back to back: interactive replicas
          // (`carryon replicate`, normal priority, this process) once, for comparison, and background
          // ones (the agent's: `carryon replicate --background` in a process of its own at nice 15 and SCHED_IDLE,
          // reading the frozen view in its own storage daemon, the holder folding at its speed limit)
          // in three pairs, each against a fio alone run just before it (the box's speed drifts).
          const envB = await rig.laptop();
          await checkout(envB, 'desk-1');
          const hb = await startHolder(envB, 'desk-1');
          try {
            /** fio alone (on an empty top), then fio with replicas back to back. */
            const fioPair = async (replicate: (e: ClientEnv) => Promise<unknown>) => {
              await upload(envB, 'desk-1', 'replicate'); // folds the writes before: each fio starts on an empty top
              const alone = await cpuDuring(() => fioNbd(hb.uri, 'randwrite', 16, { runtimeS: fioS }));
              await upload(envB, 'desk-1', 'replicate');
              let fioDone = false;
              const times: number[] = [];
              const pauses: number[] = [];
              let loopError: unknown = null;
              const loop = (async () => {
                while (!fioDone) times.push((await timed(() => replicate(recordingPauses(envB, pauses)))).seconds);
              })().catch((e: unknown) => (loopError = e));
              const during = await cpuDuring(() => fioNbd(hb.uri, 'randwrite', 16, { runtimeS: fioS }));
              fioDone = true;
              await loop;
              if (loopError) throw loopError;
              return { alone, during, times, pauses };
            };
            const ways: { key: string; label: string; pairs: number; replicate: (e: ClientEnv) => Promise<unknown> }[] = [
              { key: 'interactive', label: 'interactive replicas (`carryon replicate`, normal priority)', pairs: 1, replicate: (e) => upload(e, 'desk-1', 'replicate') },
              { key: 'background', label: 'background replicas (the agent\'s: `carryon replicate --background`, nice 15 and SCHED_IDLE, sent at the policy\'s default background rate of 8 MiB/s, each chunk counted as at least 64 KiB, fold at its speed limit)', pairs: 3, replicate: (e) => replicateInBackground(e, 'desk-1') },
            ];
            for (const way of ways) {
              const pairs: { alone: Awaited<ReturnType<typeof fioPair>>['alone']; during: Awaited<ReturnType<typeof fioPair>>['during']; times: number[]; pauses: number[] }[] = [];
              for (let p = 0; p < way.pairs; p++) pairs.push(await fioPair(way.replicate));
              const ratios = pairs.map((x) => x.during.value.iops / x.alone.value.iops);
              const r = stats(ratios).median;
              const mid = pairs[ratios.indexOf([...ratios].sort((a, b) => a - b)[Math.floor(ratios.length / 2)]!)]!;
              const times = pairs.flatMap((x) => x.times);
              const pauses = pairs.flatMap((x) => x.pauses);
              const target = way.key === 'interactive' ? 'for comparison: the target is the background replica\'s' : `target ≥ 0.7: ${met(r >= 0.7)}`;
              fioRows.push({ section, name: `4 KiB random write IOPS, QD16, through the held disk while ${way.label} run back to back (${sizeGiB} GiB desktop, fio ${fioS} s)`,
                value: mid.during.value.iops, unit: 'IOPS', runs: pairs.length, spread: stats(pairs.map((x) => x.during.value.iops)).spread,
                peer: { name: 'same fio, same desktop, no replica, just before', value: mid.alone.value.iops, unit: 'IOPS' },
                note: `${r.toFixed(2)}× (${pairs.length > 1 ? `median of ${pairs.length} back-to-back pairs: ${ratios.map((x) => x.toFixed(2)).join(', ')}; ` : ''}${target}); ${times.length} replicas, median ${stats(times).median.toFixed(1)} s each; p99 ${(mid.during.value.p99Us / 1000).toFixed(1)} ms vs ${(mid.alone.value.p99Us / 1000).toFixed(1)} ms; guest I/O paused per point in time ${pauseRange(pauses)}; CPU meanwhile (${nproc} cores, the median pair): ${mid.during.cpu} (alone: ${mid.alone.cpu})` });
            }
          } finally {
            await hb.stop();
          }
        }
      } finally {
        for (const d of desks) await closeDesk(d);
      }

      rows.push(...fioRows);
      const all = [...replicas.values()].flat();
      const byteRatio = stats(all.map((r) => r.wire / r.compressed));
      const wire = stats(all.map((r) => r.wire));
      const comp = stats(all.map((r) => r.compressed));
      rows.push({ section, name: `bytes a live replica sends after ${changeLabel} of typical-content 64 KiB writes`, value: wire.median / MB, unit: 'MB', runs: wire.runs, spread: wire.spread,
        peer: { name: `the written data, zstd level ${PAGES_ZSTD_LEVEL} per write`, value: comp.median / MB, unit: 'MB' },
        note: `${byteRatio.median.toFixed(3)}× (median of per-replica ratios, ${Math.min(...byteRatio.values).toFixed(3)}–${Math.max(...byteRatio.values).toFixed(3)}; target ≤ 1.05: ${met(byteRatio.median <= 1.05)})` });
      const t4 = stats(replicas.get(sizeGiB)!.map((r) => r.seconds));
      const t16 = stats(replicas.get(bigGiB)!.map((r) => r.seconds));
      const scaling = t16.median / t4.median;
      rows.push({ section, name: `live replica wall time after ${changeLabel} of 64 KiB writes, ${bigGiB} GiB desktop`, value: t16.median, unit: 's', runs: t16.runs, spread: t16.spread,
        peer: { name: `same writes, ${sizeGiB} GiB desktop`, value: t4.median, unit: 's' },
        note: `${scaling.toFixed(2)}× (target ≤ 1.2: ${met(scaling <= 1.2)}); ${sizeGiB} GiB spread ${(t4.spread * 100).toFixed(0)}%; guest I/O paused per point in time ${pauseRange(idlePauses)} (no I/O in flight); median phases, ms, ${sizeGiB} / ${bigGiB} GiB: ${phasesSideBySide(replicas.get(sizeGiB)!, replicas.get(bigGiB)!)}` });
      if (chainRow) rows.push(chainRow);
      const o = stats(offToCommit);
      const rt = stats(running);
      const st = stats(stopped);
      rows.push({ section, name: `check-in of the running ${sizeGiB} GiB desktop, ${changeLabel} written since the last replica: holder's stop to commit`, value: o.median, unit: 's', runs: o.runs, spread: o.spread,
        peer: { name: 'check-in of the stopped desktop, same change', value: st.median, unit: 's' },
        note: `target ≤ 2 s: ${met(o.median <= 2)}; the whole running check-in (live bulk, stop, rest) ${rt.median.toFixed(2)} s` });
      return rows;
    },
  };
}
