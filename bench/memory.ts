import { open, rm } from 'node:fs/promises';
import { randomBytes } from 'node:crypto';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { MB, run } from './lib/measure.js';
import type { BenchRow, BenchSection } from './types.js';

/** A sparse image: `dataEvery` bytes apart, 1 MiB of random data; the rest reads as zeros. */
async function sparseImage(path: string, bytes: number, dataEvery: number): Promise<void> {
  const fh = await open(path, 'w');
  try {
    await fh.truncate(bytes);
    for (let off = 0; off < bytes; off += dataEvery) await fh.write(randomBytes(1 << 20), 0, 1 << 20, off);
  } finally {
    await fh.close();
  }
}

/** Peak memory of importing a large image (issue target: 20 GiB in < 300 MiB RSS). */
export function memorySection(work: string, sizeGiB: number): BenchSection {
  return {
    name: `Import memory, ${sizeGiB} GiB image`,
    async run() {
      const image = join(work, 'memory.raw');
      const store = join(work, 'memory-store');
      await sparseImage(image, sizeGiB * 2 ** 30, 16 << 20);
      try {
        const child = fileURLToPath(new URL('./import-child.js', import.meta.url));
        const { stdout } = await run(process.execPath, [child, image, store], { maxBuffer: 1 << 20 });
        const r = JSON.parse(stdout) as { seconds: number; bytesRead: number; maxRssBytes: number };
        const rss = r.maxRssBytes / 2 ** 20;
        const qemu = await run('/usr/bin/time', ['-f', '%M', 'qemu-img', 'convert', '-O', 'raw', image, join(work, 'memory-copy.raw')]).catch(() => null);
        const qemuRss = qemu ? Number(qemu.stderr.trim().split('\n').pop()) / 1024 : NaN;
        return [{
          section: 'memory', name: `peak RSS importing a ${sizeGiB} GiB image (1 MiB of data per 16 MiB, the rest zeros)`, value: rss, unit: 'MiB', runs: 1, spread: 0,
          ...(Number.isFinite(qemuRss) ? { peer: { name: 'qemu-img convert -O raw of the same image', value: qemuRss, unit: 'MiB' } } : {}),
          note: `target < 300 MiB: ${rss < 300 ? 'met' : 'MISSED'}; ${(r.bytesRead / r.seconds / MB).toFixed(0)} MB/s read`,
        }] satisfies BenchRow[];
      } finally {
        await rm(image, { force: true });
        await rm(join(work, 'memory-copy.raw'), { force: true });
        await rm(store, { recursive: true, force: true });
      }
    },
  };
}
