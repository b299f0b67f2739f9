import { NODE_FLAGS } from '../src/core/runtime/node-flags.js';
import { spawn } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import { rm } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { release, type ClientEnv } from '../src/client/ops.js';
import { writeTestImage } from '../src/demo/image.js';
import { MB, peerEnv, settle, stats } from './lib/measure.js';
import { Rig } from './lib/rig.js';
import type { BenchRow, BenchSection } from './types.js';

const CLI = fileURLToPath(new URL('../src/cli/carryon.cjs', import.meta.url));
const COUNTS = [1, 4, 8];

/** Runs a command and resolves with its wall time in seconds (rejects on a non-zero exit). */
function timedProcess(cmd: string, args: string[], env: NodeJS.ProcessEnv = process.env): Promise<number> {
  const t = process.hrtime.bigint();
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, { stdio: ['ignore', 'ignore', 'pipe'], env });
    let err = '';
    child.stderr.on('data', (d: Buffer) => { err = (err + d.toString()).slice(-4000); });
    child.once('error', reject);
    child.once('exit', (code) => (code === 0 ? resolve(Number(process.hrtime.bigint() - t) / 1e9) : reject(new Error(`${cmd} ${args.join(' ')} exited ${code}: ${err}`))));
  });
}

/** Starts every job at once; the batch's wall time is the slowest one's. */
async function batch(jobs: (() => Promise<number>)[]): Promise<{ wall: number; each: number[] }> {
  const t = process.hrtime.bigint();
  const each = await Promise.all(jobs.map((j) => j()));
  return { wall: Number(process.hrtime.bigint() - t) / 1e9, each };
}

/**
 * N laptops check out at once (N = 1, 4, 8), against one transfer server and then two. Each
 * laptop is its own Carryon home and its own `carryon checkout` process (as N machines would
 * run it), each checking out its own clone of the same desktop into a LUKS qcow2 chain through
 * qemu-storage-daemon. Peer: N `rsync`s of the same image to empty targets at once.
 */
export function concurrentSection(work: string, sizeMiB: number): BenchSection {
  return {
    name: `Concurrent check-outs: 1, 4 and 8 laptops at once against 1 and 2 transfer servers (${sizeMiB} MiB desktop)`,
    async run() {
      const rows: BenchRow[] = [];
      const size = sizeMiB * 2 ** 20;
      const dir = join(work, 'concurrent');
      const image = join(work, 'desk-concurrent.raw');
      await writeTestImage(image, size, 'mixed');
      const max = Math.max(...COUNTS);
      // Slots enough for every laptop on one server: the figure is throughput, not queueing.
      const rig = await Rig.start(dir, image, undefined, { desktops: max, slots: max });
      const passwordFile = join(work, 'bench-user.pw');
      writeFileSync(passwordFile, 'bench-user-pw', { mode: 0o600 });
      try {
        for (const servers of [1, 2]) {
          if (servers === 2) await rig.addTransferServer();
          for (const n of COUNTS) {
            const laptops: ClientEnv[] = [];
            for (let i = 0; i < n; i++) laptops.push(await rig.laptop());
            const desk = (i: number) => (i === 0 ? 'desk' : `desk-${i}`);
            const before = (await rig.wire()).bytesOut;
            await settle();
            const ours = await batch(laptops.map((env, i) => () => timedProcess(process.execPath, [...NODE_FLAGS, CLI, '--home', env.home, '--user', 'bench', '--password-file', passwordFile, '--quiet', 'checkout', desk(i)])));
            const wire = (await rig.wire()).bytesOut - before;
            for (const [i, env] of laptops.entries()) {
              await release(env, desk(i), 'rollback');
              await rm(env.home, { recursive: true, force: true });
            }
            await settle();
            const theirs = await batch(laptops.map((_, i) => async () => {
              const dst = join(work, `rsync-concurrent-${i}.raw`);
              return timedProcess('rsync', [image, dst], peerEnv());
            }));
            for (let i = 0; i < n; i++) await rm(join(work, `rsync-concurrent-${i}.raw`), { force: true });
            const per = stats(ours.each);
            const perPeer = stats(theirs.each);
            const what = `${n} laptop${n > 1 ? 's' : ''} at once, ${servers} transfer server${servers > 1 ? 's' : ''}`;
            const peer = `${n} rsync${n > 1 ? 's' : ''} of the image to empty targets at once`;
            rows.push({ section: 'concurrent', name: `${what}: desktop data delivered`, value: (n * size) / MB / ours.wall, unit: 'MB/s', runs: 1, spread: 0,
              peer: { name: peer, value: (n * size) / MB / theirs.wall, unit: 'MB/s' },
              note: `${n} × ${sizeMiB} MiB mixed image in ${ours.wall.toFixed(1)} s (rsync ${theirs.wall.toFixed(1)} s); ${(wire / MB / ours.wall).toFixed(0)} MB/s on the wire (zero chunks never travel, the rest compressed)` });
            rows.push({ section: 'concurrent', name: `${what}: wall time per laptop`, value: per.median, unit: 's', runs: per.runs, spread: per.spread,
              peer: { name: peer, value: perPeer.median, unit: 's' },
              note: `slowest laptop ${Math.max(...ours.each).toFixed(1)} s; includes login, the two LUKS layers (re-keyed copies of the templates made at enrolment) and the fill` });
          }
        }
      } finally {
        await rig.close();
        await rm(dir, { recursive: true, force: true, maxRetries: 5 });
        await rm(image, { force: true });
        await rm(passwordFile, { force: true });
      }
      return rows;
    },
  };
}
