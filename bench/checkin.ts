import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { open, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { NODE_FLAGS } from '../src/core/runtime/node-flags.js';
import { parseTrace, type TraceSpan } from '../src/files/trace.js';
import { checkout, release, upload, type ClientEnv } from '../src/client/ops.js';
import { serveDesktop } from '../src/client/ops/serve.js';
import { NbdClient } from '../src/nbd/client.js';
import { writeTestImage } from '../src/demo/image.js';
import { MB, ownCpuSeconds, repeat, run, settle, stats, timed } from './lib/measure.js';
import { Rig } from './lib/rig.js';
import type { BenchRow, BenchSection } from './types.js';

const WRITE = 64 * 1024;
const sectionLabel = (gib: number) => `${gib} GiB check-in section`;

export type WriteContent = 'random' | 'typical';
const VOCAB = 'the of and to in is was for on that with as by at from desktop laptop offline user file report data system windows update log error value table page'.split(' ');

/** What a guest writes: random (media, encrypted, compressed files) or typical (half such data, half text-like). */
export function writeData(kind: WriteContent): Buffer {
  const data = randomBytes(WRITE);
  if (kind === 'random') return data;
  let off = 0;
  const pick = randomBytes(WRITE / 2);
  for (let i = 0; off < WRITE / 2; i++) off += data.write(`${VOCAB[pick[i]! % VOCAB.length]} `, off, 'latin1');
  return data;
}

/** `changeBytes` of 64 KiB writes at random aligned offsets, through the served chain (as a VM writes) and into a raw copy. */
export async function changeOnePercent(env: ClientEnv, rawCopy: string, size: number, changeBytes: number, kind: WriteContent): Promise<number> {
  const n = Math.round(changeBytes / WRITE);
  const fh = await open(rawCopy, 'r+');
  const served = await serveDesktop(env, 'desk');
  try {
    const c = await NbdClient.connect(served.socketPath, 'disk0');
    for (let i = 0; i < n; i++) {
      const off = Math.floor(Math.random() * (size / WRITE)) * WRITE;
      const data = writeData(kind);
      await c.write(off, data);
      await fh.write(data, 0, WRITE, off);
    }
    await c.flush();
    await c.close();
  } finally {
    await served.close();
    await fh.close();
  }
  // What whole changed chunks would have cost (the reference for the delta path): ≈ the bytes written.
  return n * WRITE;
}

const CLI = fileURLToPath(new URL('../src/cli/carryon.cjs', import.meta.url));

/**
 * `carryon ARGS` as a user runs it: a process of its own (the launcher's node flags), the vault
 * key at its real cost (the bench's lowered CARRYON_SCRYPT_N is not passed on), CARRYON_TRACE=1
 * for the phase breakdown. Wall time from spawn to exit.
 */
export async function cliRun(env: ClientEnv, args: string[], nodeArgs: string[] = []): Promise<{ seconds: number; spans: TraceSpan[]; stdout: string }> {
  const pw = join(env.home, '..', `${env.home.split('/').pop()}.password`);
  await writeFile(pw, `${await env.password()}\n`, { mode: 0o600 });
  const childEnv: NodeJS.ProcessEnv = { ...process.env, CARRYON_TRACE: '1' };
  delete childEnv.CARRYON_SCRYPT_N;
  delete childEnv.CARRYON_INSECURE_TEST_KDF;
  delete childEnv.NODE_ENV;
  const t = process.hrtime.bigint();
  const argv = [...NODE_FLAGS, ...nodeArgs, CLI, '--home', env.home, '--user', env.user!, '--password-file', pw, '--quiet', ...args];
  // PERF_OUT=FILE: a check-out's page faults recorded with their call stacks (bench/profile-second.ts, CLI=1).
  const perf = process.env.PERF_OUT && args[0] === 'checkout' ? ['record', '-q', '-g', '-e', 'page-faults', '-o', process.env.PERF_OUT, '--', process.execPath] : null;
  const child = spawn(perf ? 'perf' : process.execPath, perf ? [...perf, '--perf-basic-prof', ...argv] : argv, { env: childEnv, stdio: ['ignore', 'pipe', 'pipe'] });
  let stdout = '';
  let stderr = '';
  child.stdout.on('data', (d: Buffer) => { stdout += d.toString(); });
  child.stderr.on('data', (d: Buffer) => { stderr += d.toString(); });
  const code = await new Promise<number | null>((resolve) => child.once('exit', resolve));
  const seconds = Number(process.hrtime.bigint() - t) / 1e9;
  if (code !== 0) throw new Error(`carryon ${args.join(' ')} exited ${code}: ${stderr}`);
  return { seconds, spans: parseTrace(stderr), stdout };
}

/** The spans as one note: `name ms` in the order they began (overlapping spans run side by side). */
export function phaseNote(spans: TraceSpan[]): string {
  return [...spans].sort((a, b) => a.startMs - b.startMs).map((s) => `${s.name} ${s.ms.toFixed(0)}`).join(', ');
}

/**
 * `carryon checkin` of one changed 64 KiB write, from process start to exit, as a user runs it
 * (vault key at its real cost: cliRun), after a `carryon checkout` from the parked copy. One
 * warm-up round (the parked copy the in-process rows left was wrapped at the bench's lowered
 * cost, which the CLI refuses: that check-out fetches everything), then three counted.
 */
async function endToEndCheckinRow(env: ClientEnv, rawCopy: string, size: number, label: string): Promise<BenchRow> {
  const times: number[] = [];
  const runs: { seconds: number; spans: TraceSpan[] }[] = [];
  for (let i = -1; i < 3; i++) {
    await cliRun(env, ['checkout', 'desk']);
    await changeOnePercent(env, rawCopy, size, WRITE, 'random');
    await settle();
    const r = await cliRun(env, ['checkin', 'desk']);
    if (i >= 0) {
      times.push(r.seconds);
      runs.push(r);
    }
  }
  const t = stats(times);
  const median = runs.find((r) => r.seconds === t.median) ?? runs[0]!;
  return { section: 'checkin', name: `check-in of one changed chunk, end to end (\`carryon checkin\` from process start to exit), ${label}`, value: t.median, unit: 's', runs: t.runs, spread: t.spread,
    note: `target ≤ 0.5 s: ${t.median <= 0.5 ? 'met' : 'MISSED'}; phases of the median run, ms (CARRYON_TRACE=1; overlapping spans run side by side): ${phaseNote(median.spans)}` };
}

async function rsyncStats(args: string[]): Promise<{ seconds: number; bytes: number }> {
  const { seconds, value } = await timed(() => run('rsync', ['--stats', ...args], { maxBuffer: 1 << 20 }));
  const sent = Number(/Total bytes sent: ([\d,]+)/.exec(value.stdout)?.[1]?.replace(/,/g, ''));
  const recv = Number(/Total bytes received: ([\d,]+)/.exec(value.stdout)?.[1]?.replace(/,/g, ''));
  return { seconds, bytes: sent + recv };
}

/** Check-out and check-in at one disk size, next to rsync and cp on the same files. */
/** `changeGiB`: the same absolute change for every disk size (1% of the smaller disk). */
export function checkinSection(work: string, sizeGiB: number, changeGiB: number, withCheckout: boolean, contents: WriteContent[] = ['random']): BenchSection {
  return {
    name: `Check-out and check-in of a ${sizeGiB} GiB desktop over loopback HTTPS vs rsync`,
    async run() {
      const rows: BenchRow[] = [];
      const size = sizeGiB * 2 ** 30;
      const dir = join(work, `checkin-${sizeGiB}`);
      const image = join(work, `desk-${sizeGiB}.raw`);
      await writeTestImage(image, size, 'mixed');
      const rig = await Rig.start(dir, image);
      try {
        const label = `${sizeGiB} GiB mixed image`;
        let env = await rig.laptop();
        if (withCheckout) {
          // Check-out and rsync in back-to-back pairs: the host's speed drifts within a run, a pair shares it.
          // CPU: this process (the laptop, its writer threads, the broker's small share) and the transfer
          // server's; rsync's sender, receiver and generator are its reaped children.
          const ours: number[] = [];
          const theirs: number[] = [];
          const wireBytes: number[] = [];
          const cpu: { laptop: number; server: number }[] = [];
          const rsyncCpu: number[] = [];
          let rsBytes = 0;
          for (let i = 0; i < 3; i++) {
            if (i > 0) {
              await release(env, 'desk', 'rollback');
              env = await rig.laptop();
            }
            const before = (await rig.wire()).bytesOut;
            await settle();
            const laptop0 = ownCpuSeconds();
            const server0 = rig.transferCpuSeconds();
            ours.push((await timed(() => checkout(env, 'desk'))).seconds);
            const laptop1 = ownCpuSeconds();
            cpu.push({ laptop: laptop1.self + laptop1.children - laptop0.self - laptop0.children, server: rig.transferCpuSeconds() - server0 });
            wireBytes.push((await rig.wire()).bytesOut - before);
            const dst = join(work, `rsync-empty-${i}.raw`);
            await settle();
            const rsync0 = ownCpuSeconds().children;
            const r = await rsyncStats([image, dst]);
            rsyncCpu.push(ownCpuSeconds().children - rsync0);
            theirs.push(r.seconds);
            rsBytes = r.bytes;
            await rm(dst, { force: true });
          }
          const co = stats(ours);
          const rs = stats(theirs);
          const wire = stats(wireBytes);
          const cp = await repeat(3, async (i) => {
            const dst = join(work, `cp-${i}.raw`);
            const { seconds } = await timed(() => run('cp', ['--sparse=always', image, dst]));
            await rm(dst, { force: true });
            return seconds;
          });
          const pairs = ours.map((t, i) => theirs[i]! / t);
          rows.push({ section: 'checkout', name: `check-out, ${label}: wall time`, value: co.median, unit: 's', runs: co.runs, spread: co.spread, peer: { name: 'rsync to an empty target', value: rs.median, unit: 's' },
            note: `pairs (rsync / Carryon, back to back): ${pairs.map((p) => `${p.toFixed(2)}×`).join(', ')} (goal ≥ 1.5× in each: ${pairs.every((p) => p >= 1.5) ? 'met' : 'MISSED'}); cp --sparse: ${cp.median.toFixed(2)} s` });
          const perGiB = (s: number) => s / sizeGiB;
          const total = stats(cpu.map((c) => c.laptop + c.server));
          const theirCpu = stats(rsyncCpu);
          const mid = cpu[ours.indexOf([...ours].sort((a, b) => a - b)[1]!)]!;
          const ratio = total.median / theirCpu.median;
          rows.push({ section: 'checkout', name: `check-out, ${label}: CPU seconds per GiB of desktop data`, value: perGiB(total.median), unit: 's/GiB', runs: total.runs, spread: total.spread,
            peer: { name: 'rsync to an empty target (sender + receiver)', value: perGiB(theirCpu.median), unit: 's/GiB' },
            note: `laptop process ${mid.laptop.toFixed(2)} s + transfer server ${mid.server.toFixed(2)} s in the median-time run; ${ratio.toFixed(2)}× rsync's CPU (goal ≤ 1: ${ratio <= 1 ? 'met' : 'MISSED'})` });
          rows.push({ section: 'checkout', name: `check-out, ${label}: bytes on the wire`, value: wire.median / MB, unit: 'MB', runs: wire.runs, spread: wire.spread, peer: { name: 'rsync to an empty target', value: rsBytes / MB, unit: 'MB' }, note: `image ${(size / MB).toFixed(0)} MB; zero chunks never travel, the rest is compressed` });
        } else {
          await checkout(env, 'desk');
        }
        // rsync's "previous copy" and the source it syncs from.
        const prev = join(work, `prev-${sizeGiB}.raw`);
        const src = join(work, `src-${sizeGiB}.raw`);
        await run('cp', ['--sparse=always', image, prev]);
        await run('cp', ['--sparse=always', image, src]);
        let checkedOut = true;
        for (const kind of contents) {
          const ours: number[] = [];
          const wire: number[] = [];
          const compressed: number[] = [];
          const theirs: number[] = [];
          const theirBytes: number[] = [];
          for (let i = 0; i < 3; i++) {
            if (!checkedOut) await checkout(env, 'desk'); // from the vault: nothing new travels
            compressed.push(await changeOnePercent(env, src, size, changeGiB * 2 ** 30, kind));
            const before = (await rig.wire()).bytesIn;
            await settle();
            const { seconds } = await timed(() => upload(env, 'desk', 'checkin'));
            checkedOut = false;
            ours.push(seconds);
            wire.push((await rig.wire()).bytesIn - before);
            await settle();
            const r = await rsyncStats(['--inplace', '--no-whole-file', '--ignore-times', src, prev]);
            theirs.push(r.seconds);
            theirBytes.push(r.bytes);
          }
          const t = stats(ours);
          const b = stats(wire);
          const rt = stats(theirs);
          const rb = stats(theirBytes);
          const c = stats(compressed);
          const ratioB = b.median / c.median;
          const what = `check-in after ${(changeGiB * 1024).toFixed(0)} MiB of ${kind === 'random' ? 'random-content' : 'typical-content'} 64 KiB writes, ${label}`;
          const peer = 'rsync --inplace --no-whole-file (local delta mode)';
          rows.push({ section: 'checkin', name: `${what}: bytes on the wire`, value: b.median / MB, unit: 'MB', runs: b.runs, spread: b.spread,
            peer: { name: peer, value: rb.median / MB, unit: 'MB' },
            note: `${ratioB.toFixed(2)}× the compressed size of the changed chunks (target ≤ 1.2: ${ratioB <= 1.2 ? 'met' : 'MISSED'}); ${(rb.median / b.median).toFixed(1)}× fewer bytes than rsync (target ≥ 5: ${rb.median / b.median >= 5 ? 'met' : 'MISSED'})` });
          rows.push({ section: 'checkin', name: `${what}: wall time`, value: t.median, unit: 's', runs: t.runs, spread: t.spread,
            peer: { name: peer, value: rt.median, unit: 's' },
            note: `${(rt.median / t.median).toFixed(1)}× less time than rsync (target ≥ 3: ${rt.median / t.median >= 3 ? 'met' : 'MISSED'})` });
        }
        if (checkedOut) await release(env, 'desk', 'rollback');
        rows.push(await endToEndCheckinRow(env, src, size, label));
        await rm(prev, { force: true });
        await rm(src, { force: true });
      } catch (err) {
        process.stderr.write(`bench: ${sectionLabel(sizeGiB)} failed: ${err instanceof Error ? err.stack : String(err)}\n`);
        throw err;
      } finally {
        await rig.close();
        await rm(dir, { recursive: true, force: true, maxRetries: 5 });
        await rm(image, { force: true });
      }
      return rows;
    },
  };
}
