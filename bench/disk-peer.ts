/**
 * The disk benchmark's peer alone: qemu-nbd serving a standalone LUKS qcow2 of a random-data
 * image, measured as `carryon serve` will be (bench/disk.ts). Prints a table; changes nothing.
 *
 *   node dist/bench/disk-peer.js [--size-mib 256] [--runtime 10] [--cache writeback|none]
 */
import { randomBytes } from 'node:crypto';
import { mkdtemp, open, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { fileUsage, measureNbdDisk, randomRewrites, withLuksPeer } from './disk.js';

const { values } = parseArgs({
  options: {
    'size-mib': { type: 'string', default: '256' },
    runtime: { type: 'string', default: '10' },
    cache: { type: 'string', default: 'writeback' },
  },
});
const sizeMiB = Number(values['size-mib']);
const runtimeS = Number(values.runtime);
const cache = values.cache === 'none' ? 'none' : 'writeback';

const work = await mkdtemp(join(process.env.BENCH_DIR ?? '/var/tmp', 'carryon-disk-peer-'));
try {
  const image = join(work, 'disk.raw');
  const fh = await open(image, 'w');
  try {
    for (let off = 0; off < sizeMiB * 2 ** 20; off += 2 ** 20) await fh.write(randomBytes(2 ** 20), 0, 2 ** 20, off);
  } finally {
    await fh.close();
  }
  const t0 = Date.now();
  await withLuksPeer(
    image,
    async ({ uri, qcow2 }) => {
      const setup = (Date.now() - t0) / 1000;
      const m = await measureNbdDisk(uri, { runtimeS, workDir: work });
      const before = await fileUsage(qcow2);
      const g = await randomRewrites(uri, { multiple: 4 });
      const after = await fileUsage(qcow2);
      const fmt = (n: number, d = 0) => n.toLocaleString('en-US', { maximumFractionDigits: d, minimumFractionDigits: d });
      const lines = [
        `qemu-nbd (cache=${cache}, aio=${cache === 'none' ? 'native' : 'threads'}) serving a LUKS qcow2 of a ${sizeMiB} MiB random image; fio ${runtimeS} s per run; setup ${setup.toFixed(1)} s`,
        '',
        '| measurement | IOPS | p99 latency | mean latency |',
        '|---|---:|---:|---:|',
        ...(['randread', 'randwrite'] as const).flatMap((rw) =>
          (['qd1', 'qd16'] as const).map((qd) => {
            const r = m[rw][qd];
            return `| 4 KiB ${rw} QD${r.iodepth} | ${fmt(r.iops)} | ${fmt(r.p99Us / 1000, 2)} ms | ${fmt(r.meanUs / 1000, 2)} ms |`;
          }),
        ),
        '',
        `| sequential read (nbdcopy) | ${fmt(m.seq.readMBs)} MB/s |`,
        `| sequential write (nbdcopy, flush) | ${fmt(m.seq.writeMBs)} MB/s |`,
        '',
        `growth: ${fmt(g.bytesWritten / 2 ** 20)} MiB of random 4 KiB writes (${g.complete ? 'complete' : 'cut short'}, ${g.seconds.toFixed(1)} s, ${fmt(g.iops)} IOPS, flush every 32)` +
          ` grew the qcow2 from ${fmt(before.allocated / 2 ** 20, 1)} to ${fmt(after.allocated / 2 ** 20, 1)} MiB allocated (${fmt((after.allocated - before.allocated) / 2 ** 20, 1)} MiB)`,
      ];
      console.log(lines.join('\n'));
    },
    { cache, aio: cache === 'none' ? 'native' : 'threads', workDir: work },
  );
} finally {
  await rm(work, { recursive: true, force: true });
}
