// Runs inside a network namespace of its own (bench/slow-link.ts starts it with `ip netns exec`):
// broker, transfer server, laptops and the rsync daemon all talk over that namespace's loopback,
// which `tc` shapes to the link under test while a timed step runs. Prints its rows as JSON.
// Two desktops: the first check-out on a small one (its whole data crosses the link at every rate),
// check-in and second check-out on a big one whose data is the small one's, the rest zeros (only the
// change crosses the link; rsync still reads the whole file on both ends).
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdir, rm, truncate, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { checkout, release, upload } from '../src/client/ops.js';
import { writeTestImage } from '../src/demo/image.js';
import { changeOnePercent } from './checkin.js';
import { MB, peerEnv, run, settle, timed } from './lib/measure.js';
import { freePort } from '../test/support/ports.js';
import { Rig } from './lib/rig.js';
import type { BenchRow } from './types.js';

const [work, sizeArg, bigArg, changeArg, ratesArg] = process.argv.slice(2);
const size = Number(sizeArg) * 2 ** 20;
const big = Number(bigArg) * 2 ** 20;
const changeBytes = Number(changeArg) * 2 ** 20;
const rates = (ratesArg ?? '').split(',').filter(Boolean);
if (!work || !Number.isFinite(size) || size <= 0 || !Number.isFinite(big) || big < size || !Number.isFinite(changeBytes) || rates.length === 0) {
  throw new Error('usage: slow-link-child WORK SIZE_MIB BIG_MIB CHANGE_MIB RATE[,RATE…]');
}
const labelOf = (rate: string) => rate.replace('mbit', ' Mbit/s');

/** The link under test on (tbf at `rate`, MTU 1500 on lo), or off (`null`: set-up steps run at loopback speed). */
async function shape(rate: string | null): Promise<void> {
  if (!rate) return void (await run('tc', ['qdisc', 'del', 'dev', 'lo', 'root']).catch(() => undefined));
  const bitsPerSec = parseRate(rate);
  // A few ms of the rate as burst (at least 16 KiB): tbf needs room for one timer tick's worth.
  const burst = Math.max(16 * 1024, Math.round(bitsPerSec / 8 / 250));
  await run('tc', ['qdisc', 'replace', 'dev', 'lo', 'root', 'tbf', 'rate', rate, 'burst', String(burst), 'latency', '100ms']);
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
  const daemon: ChildProcess = spawn('rsync', ['--daemon', '--no-detach', `--config=${conf}`, `--port=${port}`, '--address=127.0.0.1'], { stdio: 'ignore', env: peerEnv() });
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
const row = (rate: string, name: string, ours: number, unit: string, peerName: string, peer: number, note?: string) =>
  rows.push({ section: 'slow-link', name: `${labelOf(rate)}: ${name}`, value: ours, unit, runs: 1, spread: 0, peer: { name: peerName, value: peer, unit }, note });
/** Seconds the link needs for `bytes` alone: where both sides send about the same bytes, no tool is much faster than this. */
const onLink = (rate: string, bytes: number) => `the link alone needs ${((bytes * 8) / parseRate(rate)).toFixed(1)} s for Carryon's bytes`;
const mib = (n: number) => `${(n / 2 ** 20).toFixed(0)} MiB`;
const gib = (n: number) => (n >= 2 ** 30 ? `${(n / 2 ** 30).toFixed(0)} GiB` : mib(n));
/** Copies a sparse image as sparse (a 4 GiB desktop of mostly zeros must not become 4 GiB of written zeros). */
const copySparse = (from: string, to: string) => run('cp', ['--sparse=always', from, to]);

/** A rig and an rsync daemon, each serving the same image as `desk`; stopped (and its files removed) after `fn`. */
async function withDesktop(name: string, image: string, fn: (rig: Rig, daemon: { url: string }, served: string) => Promise<void>): Promise<void> {
  const dir = join(work!, name);
  const served = join(dir, 'rsyncd');
  await mkdir(served, { recursive: true });
  await copySparse(image, join(served, 'desk.raw'));
  const rig = await Rig.start(join(dir, 'rig'), image);
  const daemon = await rsyncDaemon(served);
  try {
    await fn(rig, daemon, served);
  } finally {
    await shape(null);
    await daemon.stop();
    await rig.close();
    await rm(dir, { recursive: true, force: true, maxRetries: 5 });
  }
}

try {
  // The small desktop: writeTestImage's mixed content (per MiB a quarter text, a quarter random, half zeros).
  const small = join(work, 'small.raw');
  await writeTestImage(small, size, 'mixed');
  const content = `${mib(size / 4)} random, ${mib(size / 4)} text, ${mib(size / 2)} zeros`;

  // First check-out, against `rsync -z` from the daemon into an empty target; a fresh laptop per link.
  await withDesktop('first', small, async (rig, daemon) => {
    for (const rate of rates) {
      const mine = await rig.laptop();
      const wire = await rig.wire();
      await settle();
      await shape(rate);
      const first = await timed(() => checkout(mine, 'desk'));
      const rs = await rsyncZ([`${daemon.url}/desk.raw`, join(work!, `rsync-first-${rate}.raw`)]);
      await shape(null);
      const bytes = (await rig.wire()).bytesOut - wire.bytesOut;
      row(rate, `first check-out of a ${mib(size)} desktop, wall time`, first.seconds, 's', 'rsync -z from an rsync daemon (empty target)', rs.seconds,
        `${content}; ${(rs.seconds / first.seconds).toFixed(2)}× rsync -z (goal ≥ 1: ${first.seconds <= rs.seconds ? 'met' : 'MISSED'}); ${onLink(rate, bytes)}`);
      row(rate, 'first check-out, bytes on the wire', bytes / MB, 'MB', 'rsync -z', rs.bytes / MB,
        `${(bytes / rs.bytes).toFixed(2)}× rsync -z's bytes (chunks sealed at import: zstd per 256 KiB chunk; rsync -z: one zlib stream)`);
      await rm(join(work!, `rsync-first-${rate}.raw`), { force: true });
      await release(mine, 'desk', 'rollback'); // the next link's laptop checks it out afresh
    }
  });

  // The big desktop: the small one's data, then zeros up to its size (a sparse file).
  const bigImage = join(work, 'big.raw');
  await copySparse(small, bigImage);
  await truncate(bigImage, big);
  await rm(small, { force: true });
  const bigContent = `${gib(big)} desktop (${mib(size / 4)} random, ${mib(size / 4)} text, the rest zeros)`;
  const change = `${(changeBytes / MB).toFixed(1)} MB (${Math.round(changeBytes / 65536)} × 64 KiB typical writes, 1%)`;
  await withDesktop('big', bigImage, async (rig, daemon, served) => {
    const mineRaw = join(work!, 'laptop.raw');
    await copySparse(bigImage, mineRaw);
    await rm(bigImage, { force: true });
    const mine = await rig.laptop();
    const other = await rig.laptop();
    await checkout(mine, 'desk'); // set-up, at loopback speed
    for (const rate of rates) {
      // Check-in after 1% changed on the laptop, against `rsync -z --inplace` pushing the same change.
      await changeOnePercent(mine, mineRaw, big, changeBytes, 'typical');
      let wire = await rig.wire();
      await settle();
      await shape(rate);
      const checkin = await timed(() => upload(mine, 'desk', 'checkin'));
      const rsPush = await rsyncZ(['--inplace', '--no-whole-file', '--ignore-times', mineRaw, `${daemon.url}/desk.raw`]);
      await shape(null);
      const checkinBytes = (await rig.wire()).bytesIn - wire.bytesIn;
      const pushRatio = rsPush.seconds / checkin.seconds;
      row(rate, `check-in of ${change} written, ${bigContent}: wall time`, checkin.seconds, 's', 'rsync -z --inplace (push)', rsPush.seconds,
        `${pushRatio.toFixed(1)}× faster than rsync -z (goal ≥ 10: ${pushRatio >= 10 ? 'met' : 'MISSED'}); ${onLink(rate, checkinBytes)}`);
      row(rate, `check-in at ${gib(big)}, bytes on the wire`, checkinBytes / MB, 'MB', 'rsync -z --inplace', rsPush.bytes / MB);

      // Someone else changes 1% on the server (not timed, unshaped); then the second check-out from the parked copy,
      // against `rsync -z --inplace` pulling the server's copy over the laptop's previous one.
      await checkout(other, 'desk');
      await changeOnePercent(other, join(served, 'desk.raw'), big, changeBytes, 'typical');
      await upload(other, 'desk', 'checkin');
      wire = await rig.wire();
      await settle();
      await shape(rate);
      const second = await timed(() => checkout(mine, 'desk'));
      const rsPull = await rsyncZ(['--inplace', '--no-whole-file', '--ignore-times', `${daemon.url}/desk.raw`, mineRaw]);
      await shape(null);
      const secondBytes = (await rig.wire()).bytesOut - wire.bytesOut;
      const pullRatio = rsPull.seconds / second.seconds;
      row(rate, `second check-out (parked copy) after ${change} changed on the server, ${gib(big)}: wall time`, second.seconds, 's', 'rsync -z --inplace (pull over the previous copy)', rsPull.seconds,
        `${second.value.chunksMoved} chunks; ${pullRatio.toFixed(1)}× faster than rsync -z (goal ≥ 10: ${pullRatio >= 10 ? 'met' : 'MISSED'}); ${onLink(rate, secondBytes)}`);
      row(rate, `second check-out at ${gib(big)}, bytes on the wire`, secondBytes / MB, 'MB', 'rsync -z --inplace', rsPull.bytes / MB);
    }
  });
} finally {
  await shape(null);
  await rm(work, { recursive: true, force: true, maxRetries: 5 });
}
process.stdout.write(`${JSON.stringify(rows)}\n`);
process.exit(0);
