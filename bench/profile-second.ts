import { existsSync } from 'node:fs';
import { mkdir, rm, writeFile } from 'node:fs/promises';
import { Session } from 'node:inspector/promises';
import { join } from 'node:path';
import { checkout, release, upload } from '../src/client/ops.js';
import { writeTestImage } from '../src/demo/image.js';
import { recordTrace, takeTrace } from '../src/files/trace.js';
import { changeOnePercent, cliRun } from './checkin.js';
import { settle, timed } from './lib/measure.js';
import { Rig } from './lib/rig.js';

/**
 * Where a second check-out (from the parked copy, after 1 % changed on the server) spends its time
 * (issue 25), not a bench section: rounds of another laptop's change and check-in, then this
 * laptop's check-out in-process, printed as wall time, the transfer server's CPU and the trace's
 * phases (STARTS=1: with their starts). CPU_PROF=FILE: a V8 CPU profile of the last round's check-out (this process). CLONE=1: instead,
 * the check-out of a clone of the parked desktop (its shared chunks copied from the parked copy).
 * CLI=1: `carryon checkout` processes instead, alternating without and with GLIBC_TUNABLES=$AB_TUNABLES
 * (AA_TUNABLES: the first side's), for an A/B of malloc settings; PERF_OUT=FILE records a check-out's
 * page faults (`perf record -e page-faults -g`). MONO=1 prints each round's CLOCK_MONOTONIC window.
 *
 *   node dist/bench/profile-second.js [GiB] [rounds]
 */
const sizeGiB = Number(process.argv[2] ?? 4);
const rounds = Number(process.argv[3] ?? 3);
const dir = process.env.PROFILE_DIR ?? '/var/tmp/carryon-profile';

async function main(): Promise<void> {
  if (!Number.isFinite(sizeGiB) || sizeGiB <= 0 || !Number.isInteger(rounds) || rounds < 1) throw new Error('usage: profile-second.js [GiB > 0] [rounds ≥ 1]');
  await mkdir(dir, { recursive: true });
  const size = sizeGiB * 2 ** 30;
  const image = join(dir, `desk-${sizeGiB}.raw`);
  if (!existsSync(image)) await writeTestImage(image, size, 'mixed');
  const rigDir = join(dir, 'rig-second');
  await rm(rigDir, { recursive: true, force: true });
  const rig = await Rig.start(rigDir, image, undefined, { desktops: 2 });
  const src = join(dir, 'second-src.raw');
  try {
    const mine = await rig.laptop();
    const other = await rig.laptop();
    await checkout(mine, 'desk');
    await release(mine, 'desk', 'rollback');
    await writeFile(src, '');
    if (process.env.CLI) {
      // CLI=1: `carryon checkout` as a process, alternating the environment with and without GLIBC_TUNABLES=$AB_TUNABLES (A/B).
      const ab = process.env.AB_TUNABLES ?? '';
      delete process.env.GLIBC_TUNABLES;
      await cliRun(mine, ['checkout', 'desk']);
      await cliRun(mine, ['rollback', 'desk']);
      for (let i = 0; i < rounds; i++) {
        const with_ = i % 2 === 1;
        await checkout(other, 'desk');
        await changeOnePercent(other, src, size, size / 100, 'random');
        await upload(other, 'desk', 'checkin');
        await settle();
        if (with_ && ab) process.env.GLIBC_TUNABLES = ab;
        if (!with_ && process.env.AA_TUNABLES) process.env.GLIBC_TUNABLES = process.env.AA_TUNABLES;
        const r = await cliRun(mine, ['checkout', 'desk']);
        delete process.env.GLIBC_TUNABLES;
        const total = r.spans.find((x) => x.name === 'total');
        console.log(`cli round ${i} ${with_ ? 'B' : 'A'}: ${r.seconds.toFixed(3)} s (total span ${total?.ms.toFixed(0)} ms, cpu ${r.spans.find((x) => x.name === 'cpu')?.ms.toFixed(0)} ms)`);
        await cliRun(mine, ['rollback', 'desk']);
      }
      return;
    }
    if (process.env.CLONE) {
      // A clone of the parked desktop: what they share is copied from the parked copy.
      const r = await measured(rig, !!process.env.CPU_PROF, () => checkout(mine, 'desk-1'));
      console.log(`clone: ${r.seconds.toFixed(3)} s, ${r.value.copiedChunks} copied, ${r.value.chunksMoved} fetched, ${r.note}`);
      return;
    }
    for (let i = 0; i < rounds; i++) {
      await checkout(other, 'desk');
      await changeOnePercent(other, src, size, size / 100, 'random');
      await upload(other, 'desk', 'checkin');
      await settle();
      const r = await measured(rig, !!process.env.CPU_PROF && i === rounds - 1, () => checkout(mine, 'desk'));
      console.log(`round ${i}: ${r.seconds.toFixed(3)} s, ${r.value.chunksMoved} chunks, ${r.note}`);
      await release(mine, 'desk', 'rollback');
    }
  } finally {
    await rig.close();
    await rm(src, { force: true });
  }
}

/** `fn` timed and traced, with this process's and the transfer server's CPU, and a CPU profile (CPU_PROF) when `profile`. */
async function measured<T>(rig: Rig, profile: boolean, fn: () => Promise<T>): Promise<{ seconds: number; value: T; note: string }> {
  const session = profile ? new Session() : null;
  if (session) {
    session.connect();
    await session.post('Profiler.enable');
    await session.post('Profiler.start');
  }
  const server0 = rig.transferCpuSeconds();
  const cpu0 = process.cpuUsage();
  const faults0 = process.resourceUsage().minorPageFault;
  takeTrace();
  recordTrace(true);
  const mono0 = process.hrtime.bigint();
  const { seconds, value } = await timed(fn);
  // MONO=1: the round's window on CLOCK_MONOTONIC, for `perf report --time` of a `perf record -k CLOCK_MONOTONIC`.
  if (process.env.MONO) console.log(`window ${Number(mono0) / 1e9},${Number(process.hrtime.bigint()) / 1e9}`);
  const spans = takeTrace();
  recordTrace(false);
  const cpu = process.cpuUsage(cpu0);
  const faults = process.resourceUsage().minorPageFault - faults0;
  const serverCpu = rig.transferCpuSeconds() - server0;
  if (session) {
    const { profile: p } = await session.post('Profiler.stop');
    await writeFile(process.env.CPU_PROF!, JSON.stringify(p));
    session.disconnect();
  }
  // STARTS=1: each span with its start, ms from the check-out's start (overlaps show).
  const t0 = Math.min(...spans.map((s) => s.startMs));
  const phases = process.env.STARTS ? [...spans].sort((a, b) => a.startMs - b.startMs).map((s) => `${s.name}@${(s.startMs - t0).toFixed(0)}+${s.ms.toFixed(0)}`) : spans.map((s) => `${s.name} ${s.ms.toFixed(0)}`);
  const note = `laptop ${(cpu.user / 1e6).toFixed(2)} user + ${(cpu.system / 1e6).toFixed(2)} system CPU s, ${faults} page faults, transfer server ${serverCpu.toFixed(2)} CPU s; ${phases.join(', ')}`;
  return { seconds, value, note };
}

main().catch((err: unknown) => {
  console.error(err);
  process.exitCode = 1;
});
