import { execFile } from 'node:child_process';
import { rm } from 'node:fs/promises';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { checkout, status } from '../src/client/ops.js';
import { serveDesktop } from '../src/client/ops/serve.js';
import { writeTestImage } from '../src/demo/image.js';
import { diskRows, measureNbdDisk, randomRewrites, withLuksPeer } from './disk.js';
import { MB } from './lib/measure.js';
import { Rig } from './lib/rig.js';
import type { BenchRow, BenchSection } from './types.js';

const run = promisify(execFile);

async function duBytes(dir: string): Promise<number> {
  const { stdout } = await run('du', ['-sb', '--apparent-size', dir]).catch(() => ({ stdout: '0' }));
  const alloc = await run('du', ['-sB1', dir]).then((r) => Number(r.stdout.split('\t')[0]), () => 0);
  void stdout;
  return alloc;
}

/**
 * The desktop's live disk as the guest sees it: fio 4 KiB random I/O at QD1 and QD16 and nbdcopy
 * sequential, through `carryon serve` (the laptop's LUKS qcow2 chain, exported by
 * qemu-storage-daemon), next to qemu-nbd serving a standalone LUKS qcow2 of the same image, in the
 * same run; then vault growth under random rewrites of 4× the disk.
 */
export function runtimeDiskSection(work: string, sizeMiB: number, runtimeS: number): BenchSection {
  return {
    name: `Runtime disk: 4 KiB random I/O through carryon serve vs qemu-nbd on a LUKS qcow2 (${sizeMiB} MiB)`,
    async run() {
      const section = 'runtime';
      const dir = join(work, 'runtime');
      const image = join(work, `runtime-${sizeMiB}.raw`);
      await writeTestImage(image, sizeMiB * 2 ** 20, 'random');
      const rig = await Rig.start(dir, image);
      const rows: BenchRow[] = [];
      try {
        const env = await rig.laptop();
        await checkout(env, 'desk');
        // Growth first, on the fresh top a check-out leaves: 4× the disk in random 4 KiB rewrites (flush every 32).
        const home = env.home;
        const before = await duBytes(home);
        const served2 = await serveDesktop(env, 'desk');
        let written = 0;
        try {
          written = (await randomRewrites(`nbd+unix:///disk0?socket=${served2.socketPath}`, { multiple: 4, maxSeconds: 120 })).bytesWritten;
        } finally {
          await served2.close();
        }
        const after = await duBytes(home);
        const [st] = await status(env, 'desk');
        const top = st!.dirtyBytes ?? 0;
        const growth = after - before;
        rows.push({ section, name: `vault growth after ${(written / MB).toFixed(0)} MB of random 4 KiB rewrites (${(written / (sizeMiB * 2 ** 20)).toFixed(1)}× the disk) into a fresh top layer`, value: growth / MB, unit: 'MB', runs: 1, spread: 0,
          peer: { name: 'data allocated in the top layer', value: top / MB, unit: 'MB' },
          note: `${(growth / Math.max(1, top)).toFixed(2)}× the top's data (goal ≤ 1.1×: ${growth <= top * 1.1 ? 'met' : 'MISSED'}); bounded by the disk size, never by the number of rewrites` });
        // Then the I/O figures on the now-allocated top (a desktop in use), next to the peer.
        const peer = await withLuksPeer(image, ({ uri }) => measureNbdDisk(uri, { runtimeS, workDir: work }), { workDir: work });
        const served = await serveDesktop(env, 'desk');
        const uri = `nbd+unix:///disk0?socket=${served.socketPath}`;
        try {
          const ours = await measureNbdDisk(uri, { runtimeS, workDir: work });
          rows.push(...diskRows(section, ours, peer, 'qemu-nbd, standalone LUKS qcow2'));
        } finally {
          await served.close();
        }
      } finally {
        await rig.close();
        await rm(dir, { recursive: true, force: true, maxRetries: 5 });
        await rm(image, { force: true });
      }
      return rows;
    },
  };
}
