import { existsSync } from 'node:fs';
import { mkdir, rm, truncate, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { writeTestImage } from '../src/demo/image.js';
import { changeOnePercent, cliRun, phaseNote } from './checkin.js';
import { settle } from './lib/measure.js';
import { Rig } from './lib/rig.js';

/**
 * Where a one-chunk `carryon checkin` spends its time (issue 25), not a bench section: one rig, a
 * CLI check-out from the parked copy, one 64 KiB write, a CLI check-in; N rounds, each printed as
 * wall time and its trace's phases (STARTS=1: each with its start, ms from process start). CPU_PROF=DIR:
 * the check-in process writes a V8 CPU profile there.
 *
 *   node dist/bench/profile-checkin.js [GiB] [rounds]
 */
const sizeGiB = Number(process.argv[2] ?? 4);
const rounds = Number(process.argv[3] ?? 4);
const dir = process.env.PROFILE_DIR ?? '/var/tmp/carryon-profile';
const WRITE = 64 * 1024;
const CHANGE = Number(process.env.CHANGE_MIB ?? 0) * 2 ** 20 || WRITE;

async function main(): Promise<void> {
  if (!Number.isFinite(sizeGiB) || sizeGiB <= 0 || !Number.isInteger(rounds) || rounds < 1) throw new Error('usage: profile-checkin.js [GiB > 0] [rounds ≥ 1]');
  await mkdir(dir, { recursive: true });
  const size = sizeGiB * 2 ** 30;
  const image = join(dir, `desk-${sizeGiB}.raw`);
  if (!existsSync(image)) await writeTestImage(image, size, 'mixed');
  const rigDir = join(dir, 'rig-checkin');
  await rm(rigDir, { recursive: true, force: true });
  const rig = await Rig.start(rigDir, image);
  const rawCopy = join(dir, 'checkin-copy.raw');
  try {
    const env = await rig.laptop();
    await writeFile(rawCopy, '');
    await truncate(rawCopy, size); // the bench's raw mirror of the writes; its content is not read here
    for (let i = 0; i < rounds; i++) {
      await cliRun(env, ['checkout', 'desk']);
      await changeOnePercent(env, rawCopy, size, CHANGE, 'random');
      await settle();
      const profile = process.env.CPU_PROF && i === rounds - 1 ? ['--cpu-prof', `--cpu-prof-dir=${process.env.CPU_PROF}`] : [];
      const server0 = rig.transferCpuSeconds();
      const r = await cliRun(env, ['checkin', 'desk'], profile);
      const serverCpu = rig.transferCpuSeconds() - server0;
      console.log(`round ${i}: ${r.seconds.toFixed(3)} s, transfer server ${serverCpu.toFixed(2)} CPU s; ${process.env.STARTS ? [...r.spans].sort((a, b) => a.startMs - b.startMs).map((s) => `${s.name}@${s.startMs.toFixed(0)}+${s.ms.toFixed(0)}`).join(", ") : phaseNote(r.spans)}`);
    }
  } finally {
    await rig.close();
    await rm(rawCopy, { force: true });
  }
}

main().catch((err: unknown) => {
  console.error(err);
  process.exitCode = 1;
});
