import { existsSync, readdirSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { mkdir, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { checkout, release } from '../src/client/ops.js';
import { writeTestImage } from '../src/demo/image.js';
import { ownCpuSeconds, settle, timed } from './lib/measure.js';
import { Rig } from './lib/rig.js';

/**
 * Where a first check-out's CPU goes (issue 25), not a bench section: one rig, N check-outs of
 * the bench's mixed image by fresh laptops, each printed as wall time, the laptop process's CPU
 * (main thread, other threads, reaped children such as qemu-img) and the transfer server's.
 * Threads are sampled from /proc every 50 ms (writer threads end with the check-out).
 *
 *   node --max-semi-space-size=32 --heap-growing-percent=200 dist/bench/profile-checkout.js [GiB] [runs]
 *
 * perf: mkfifo /tmp/ctl; PERF_CTL=/tmp/ctl perf record -g --control=fifo:/tmp/ctl -D -1 -- node --perf-basic-prof …
 * PROFILE_DIR (default /var/tmp/carryon-profile) keeps the image between invocations.
 */
const sizeGiB = Number(process.argv[2] ?? 1);
const runs = Number(process.argv[3] ?? 3);
const dir = process.env.PROFILE_DIR ?? '/var/tmp/carryon-profile';
const TICK = 100;

/** CPU seconds per thread (by tid) of this process, kept at the last value seen. */
function sampleThreads(into: Map<number, { name: string; seconds: number }>): void {
  for (const tid of readdirSync('/proc/self/task')) {
    try {
      const stat = readFileSync(`/proc/self/task/${tid}/stat`, 'utf8');
      const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ').map(Number);
      const name = readFileSync(`/proc/self/task/${tid}/comm`, 'utf8').trim();
      into.set(Number(tid), { name, seconds: (f[11]! + f[12]!) / TICK });
    } catch {
      // The thread ended between the listing and the read.
    }
  }
}

/** Minor page faults of this process so far (all threads; field 10 of /proc/self/stat). */
function minorFaults(): number {
  const stat = readFileSync('/proc/self/stat', 'utf8');
  return Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[7]);
}

/** Under `perf record --control=fifo:CTL -D -1`, PERF_CTL=CTL: perf samples the check-outs only (not the rig's import). */
function perfControl(cmd: 'enable' | 'disable'): void {
  if (process.env.PERF_CTL) writeFileSync(process.env.PERF_CTL, `${cmd}\n`);
}

async function main(): Promise<void> {
  await mkdir(dir, { recursive: true });
  const image = join(dir, `desk-${sizeGiB}.raw`);
  if (!existsSync(image) || statSync(image).size !== sizeGiB * 2 ** 30) await writeTestImage(image, sizeGiB * 2 ** 30, 'mixed');
  const rigDir = join(dir, 'rig');
  await rm(rigDir, { recursive: true, force: true });
  const rig = await Rig.start(rigDir, image);
  try {
    let env = await rig.laptop();
    for (let i = 0; i < runs; i++) {
      if (i > 0) {
        await release(env, 'desk', 'rollback');
        await rm(env.home, { recursive: true, force: true });
        env = await rig.laptop();
      }
      await settle();
      const before = new Map<number, { name: string; seconds: number }>();
      sampleThreads(before);
      const after = new Map<number, { name: string; seconds: number }>();
      const timer = setInterval(() => sampleThreads(after), 50);
      const faults0 = minorFaults();
      const l0 = ownCpuSeconds();
      const s0 = rig.transferCpuSeconds();
      perfControl('enable');
      // Monotonic µs, the clock of `--cpu-prof` timestamps: the check-out's window in such a profile.
      if (process.env.PROFILE_MARKS) console.log(`mark start ${process.hrtime.bigint() / 1000n}`);
      const { seconds } = await timed(() => checkout(env, 'desk'));
      perfControl('disable');
      if (process.env.PROFILE_MARKS) console.log(`mark end ${process.hrtime.bigint() / 1000n}`);
      const l1 = ownCpuSeconds();
      const faults = minorFaults() - faults0;
      const s1 = rig.transferCpuSeconds();
      clearInterval(timer);
      sampleThreads(after);
      const byName = new Map<string, number>();
      for (const [tid, t] of after) {
        const d = t.seconds - (before.get(tid)?.seconds ?? 0);
        const name = tid === process.pid ? 'main' : before.has(tid) ? t.name : `new ${t.name}`;
        if (d > 0) byName.set(name, (byName.get(name) ?? 0) + d);
      }
      const self = l1.self - l0.self;
      const children = l1.children - l0.children;
      const server = s1 - s0;
      const threads = [...byName].sort((a, b) => b[1] - a[1]).map(([n, s]) => `${n} ${s.toFixed(2)}`).join(', ');
      console.log(`run ${i}: wall ${seconds.toFixed(2)} s; laptop ${(self + children).toFixed(2)} s (process ${self.toFixed(2)} [${threads}], children ${children.toFixed(2)}); server ${server.toFixed(2)} s; ${(faults / 1000).toFixed(0)}k minor faults; total per GiB ${((self + children + server) / sizeGiB).toFixed(2)}`);
    }
  } finally {
    await rig.close();
  }
}

await main();
