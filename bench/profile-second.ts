import { existsSync } from 'node:fs';
import { mkdir, rm, writeFile } from 'node:fs/promises';
import { Session } from 'node:inspector/promises';
import { join } from 'node:path';
import { checkout, release, upload } from '../src/client/ops.js';
import { writeTestImage } from '../src/demo/image.js';
import { recordTrace, takeTrace } from '../src/files/trace.js';
import { changeOnePercent } from './checkin.js';
import { settle, timed } from './lib/measure.js';
import { Rig } from './lib/rig.js';

/**
 * Where a second check-out (from the parked copy, after 1 % changed on the server) spends its time
 * (issue 25), not a bench section: rounds of another laptop's change and check-in, then this
 * laptop's check-out in-process, printed as wall time, the transfer server's CPU and the trace's
 * phases. CPU_PROF=FILE: a V8 CPU profile of the last round's check-out (this process). CLONE=1: instead,
 * the check-out of a clone of the parked desktop (its shared chunks copied from the parked copy).
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
    if (process.env.CLONE) {
      // A clone of the parked desktop: what they share is copied from the parked copy.
      const profile = process.env.CPU_PROF ? new Session() : null;
      if (profile) {
        profile.connect();
        await profile.post('Profiler.enable');
        await profile.post('Profiler.start');
      }
      const cpu0 = process.cpuUsage();
      takeTrace();
      recordTrace(true);
      const { seconds, value } = await timed(() => checkout(mine, 'desk-1'));
      const spans = takeTrace();
      recordTrace(false);
      const cpu = process.cpuUsage(cpu0);
      if (profile) {
        const { profile: p } = await profile.post('Profiler.stop');
        await writeFile(process.env.CPU_PROF!, JSON.stringify(p));
        profile.disconnect();
      }
      console.log(`clone: ${seconds.toFixed(3)} s, ${value.copiedChunks} copied, ${value.chunksMoved} fetched, laptop ${(cpu.user / 1e6).toFixed(2)} user + ${(cpu.system / 1e6).toFixed(2)} system CPU s; ${spans.map((s) => `${s.name} ${s.ms.toFixed(0)}`).join(', ')}`);
      return;
    }
    for (let i = 0; i < rounds; i++) {
      await checkout(other, 'desk');
      await changeOnePercent(other, src, size, size / 100, 'random');
      await upload(other, 'desk', 'checkin');
      await settle();
      const profile = process.env.CPU_PROF && i === rounds - 1 ? new Session() : null;
      if (profile) {
        profile.connect();
        await profile.post('Profiler.enable');
        await profile.post('Profiler.start');
      }
      const server0 = rig.transferCpuSeconds();
      const cpu0 = process.cpuUsage();
      takeTrace();
      recordTrace(true);
      const { seconds, value } = await timed(() => checkout(mine, 'desk'));
      const spans = takeTrace();
      const serverCpu = rig.transferCpuSeconds() - server0;
      const cpu = process.cpuUsage(cpu0);
      recordTrace(false);
      if (profile) {
        const { profile: p } = await profile.post('Profiler.stop');
        await writeFile(process.env.CPU_PROF!, JSON.stringify(p));
        profile.disconnect();
      }
      console.log(`round ${i}: ${seconds.toFixed(3)} s, ${value.chunksMoved} chunks, laptop ${(cpu.user / 1e6).toFixed(2)} user + ${(cpu.system / 1e6).toFixed(2)} system CPU s, transfer server ${serverCpu.toFixed(2)} CPU s; ${spans.map((s) => `${s.name} ${s.ms.toFixed(0)}`).join(', ')}`);
      await release(mine, 'desk', 'rollback');
    }
  } finally {
    await rig.close();
    await rm(src, { force: true });
  }
}

main().catch((err: unknown) => {
  console.error(err);
  process.exitCode = 1;
});
