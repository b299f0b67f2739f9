// Runs inside a network namespace of its own (bench/slow-link.ts starts it with `ip netns exec`):
// broker, transfer server, laptops and the rsync daemon all talk over that namespace's loopback,
// which `tc` shapes to the link under test while a timed step runs. Prints its rows as JSON.
import { spawn, type ChildProcess } from 'node:child_process';
import { copyFile, mkdir, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { checkout, upload } from '../src/client/ops.js';
import { writeTestImage } from '../src/demo/image.js';
import { changeOnePercent } from './checkin.js';
import { MB, run, settle, timed } from './lib/measure.js';
import { freePort } from '../test/support/ports.js';
import { Rig } from './lib/rig.js';
import type { BenchRow } from './types.js';

const [work, sizeArg, changeArg, rate, label] = process.argv.slice(2);
const size = Number(sizeArg) * 2 ** 20;
const changeBytes = Number(changeArg) * 2 ** 20;
if (!work || !Number.isFinite(size) || size <= 0 || !Number.isFinite(changeBytes) || !rate || !label) {
  throw new Error('usage: slow-link-child WORK SIZE_MIB CHANGE_MIB RATE LABEL');
}

/** The link under test on (tbf at `rate`, MTU 1500 on lo) or off (set-up steps run at loopback speed). */
async function shape(on: boolean): Promise<void> {
  if (!on) return void (await run('tc', ['qdisc', 'del', 'dev', 'lo', 'root']).catch(() => undefined));
  const bitsPerSec = parseRate(rate!);
  // A few ms of the rate as burst (at least 16 KiB): tbf needs room for one timer tick's worth.
  const burst = Math.max(16 * 1024, Math.round(bitsPerSec / 8 / 250));
  await run('tc', ['qdisc', 'replace', 'dev', 'lo', 'root', 'tbf', 'rate', rate!, 'burst', String(burst), 'latency', '100ms']);
}

function parseRate(r: string): number {
  const m = /^(\d+)(k|m|g)bit$/.exec(r);
  if (!m) throw new Error(`rate must look like 100mbit, got ${r}`);
  return Number(m[1]) * { k: 1e3, m: 1e6, g: 1e9 }[m[2] as 'k' | 'm' | 'g'];
}


/** An rsync daemon (the peer a user on a slow link would pick: `rsync -z` against it) over `dir`. */
async function rsyncDaemon(dir: string): Promise<{ url: string; stop: () => Promise<void> }> {
  const port = await freePort();
  const conf = join(dir, '..', 'rsyncd.conf');
  await writeFile(conf, `[m]\n  path = ${dir}\n  read only = false\n  use chroot = false\n  uid = 0\n  gid = 0\n`);
  const daemon: ChildProcess = spawn('rsync', ['--daemon', '--no-detach', `--config=${conf}`, `--port=${port}`, '--address=127.0.0.1'], { stdio: 'ignore' });
  for (let i = 0; i < 100; i++) {
    if (await run('rsync', [`rsync://127.0.0.1:${port}/`]).then(() => true, () => false)) break;
    await new Promise((r) => setTimeout(r, 50));
  }
  return {
    url: `rsync://127.0.0.1:${port}/m`,
    stop: async () => {
      const exited = new Promise((r) => daemon.once('exit', r));
      daemon.kill('SIGTERM');
      await exited;
    },
  };
}

async function rsyncZ(args: string[]): Promise<{ seconds: number; bytes: number }> {
  const { seconds, value } = await timed(() => run('rsync', ['-z', '--stats', ...args], { maxBuffer: 1 << 20 }));
  const sent = Number(/Total bytes sent: ([\d,]+)/.exec(value.stdout)?.[1]?.replace(/,/g, ''));
  const recv = Number(/Total bytes received: ([\d,]+)/.exec(value.stdout)?.[1]?.replace(/,/g, ''));
  return { seconds, bytes: sent + recv };
}

const rows: BenchRow[] = [];
const dir = join(work, 'rig');
const image = join(work, 'desk.raw');
const served = join(work, 'rsyncd');
const mineRaw = join(work, 'laptop.raw');
await mkdir(served, { recursive: true });
await writeTestImage(image, size, 'mixed');
await copyFile(image, join(served, 'desk.raw'));
await copyFile(image, mineRaw);
const rig = await Rig.start(dir, image);
const daemon = await rsyncDaemon(served);
const row = (name: string, ours: number, unit: string, peerName: string, peer: number, note?: string) =>
  rows.push({ section: 'slow-link', name: `${label}: ${name}`, value: ours, unit, runs: 1, spread: 0, peer: { name: peerName, value: peer, unit }, note });
try {
  const mine = await rig.laptop();
  const other = await rig.laptop();

  // First check-out, against `rsync -z` from the daemon into an empty target.
  let wire = await rig.wire();
  await settle();
  await shape(true);
  const first = await timed(() => checkout(mine, 'desk'));
  const rsFirst = await rsyncZ([`${daemon.url}/desk.raw`, join(work, 'rsync-first.raw')]);
  await shape(false);
  const firstBytes = (await rig.wire()).bytesOut - wire.bytesOut;
  row('first check-out, wall time', first.seconds, 's', 'rsync -z from an rsync daemon (empty target)', rsFirst.seconds,
    `${(rsFirst.seconds / first.seconds).toFixed(2)}× rsync -z (goal ≥ 1: ${first.seconds <= rsFirst.seconds ? 'met' : 'MISSED'})`);
  row('first check-out, bytes on the wire', firstBytes / MB, 'MB', 'rsync -z', rsFirst.bytes / MB);

  // Check-in after 1% changed on the laptop (typical-content 64 KiB writes), against `rsync -z --inplace` pushing the same change.
  await changeOnePercent(mine, mineRaw, size, changeBytes, 'typical');
  wire = await rig.wire();
  await settle();
  await shape(true);
  const checkin = await timed(() => upload(mine, 'desk', 'checkin'));
  const rsPush = await rsyncZ(['--inplace', '--no-whole-file', '--ignore-times', mineRaw, `${daemon.url}/desk.raw`]);
  await shape(false);
  const checkinBytes = (await rig.wire()).bytesIn - wire.bytesIn;
  row(`check-in of ${(changeBytes / MB).toFixed(1)} MB written, wall time`, checkin.seconds, 's', 'rsync -z --inplace (push)', rsPush.seconds,
    `${(rsPush.seconds / checkin.seconds).toFixed(1)}× faster than rsync -z (goal ≥ 10)`);
  row('check-in, bytes on the wire', checkinBytes / MB, 'MB', 'rsync -z --inplace', rsPush.bytes / MB);

  // Someone else changes the desktop on the server (not timed, unshaped); then the second check-out from the parked copy,
  // against `rsync -z --inplace` pulling the server's copy over the laptop's previous one.
  await checkout(other, 'desk');
  await changeOnePercent(other, join(served, 'desk.raw'), size, changeBytes, 'typical');
  await upload(other, 'desk', 'checkin');
  wire = await rig.wire();
  await settle();
  await shape(true);
  const second = await timed(() => checkout(mine, 'desk'));
  const rsPull = await rsyncZ(['--inplace', '--no-whole-file', '--ignore-times', `${daemon.url}/desk.raw`, mineRaw]);
  await shape(false);
  const secondBytes = (await rig.wire()).bytesOut - wire.bytesOut;
  row('second check-out (parked copy), wall time', second.seconds, 's', 'rsync -z --inplace (pull over the previous copy)', rsPull.seconds,
    `${second.value.chunksMoved} chunks; ${(rsPull.seconds / second.seconds).toFixed(1)}× faster than rsync -z (goal ≥ 10)`);
  row('second check-out, bytes on the wire', secondBytes / MB, 'MB', 'rsync -z --inplace', rsPull.bytes / MB);
} finally {
  await shape(false);
  await daemon.stop();
  await rig.close();
  await rm(work, { recursive: true, force: true, maxRetries: 5 });
}
process.stdout.write(`${JSON.stringify(rows)}\n`);
process.exit(0);
