import { randomBytes } from 'node:crypto';
import { rm } from 'node:fs/promises';
import { join } from 'node:path';
import { generateLineageKeys } from '../src/core/keys.js';
import { diffManifests, encodeManifest } from '../src/core/manifest.js';
import { writeTestImage } from '../src/demo/image.js';
import { VaultDisk } from '../src/disk/vault-disk.js';
import { importImage } from '../src/import/import.js';
import { PackChunkStore } from '../src/store/pack-chunk-store.js';
import { MB, stats, timed } from './lib/measure.js';
import type { BenchRow, BenchSection } from './types.js';

const FRAME = 37;

/** Bytes a 1%-random-write check-in sends, and manifest size, for each chunk size. */
export function sweepSection(work: string, sizeGiB: number): BenchSection {
  return {
    name: `Chunk-size sweep on a ${sizeGiB} GiB mixed image (1% random 64 KiB writes)`,
    async run() {
      const size = sizeGiB * 2 ** 30;
      const image = join(work, 'sweep.raw');
      await writeTestImage(image, size, 'mixed');
      const writes = Array.from({ length: 3 }, () => Array.from({ length: Math.round((size * 0.01) / 65536) }, () => Math.floor(Math.random() * (size / 65536)) * 65536));
      const rows: BenchRow[] = [];
      for (const chunkSize of [64 * 1024, 256 * 1024, 1 << 20, 4 << 20]) {
        const dir = join(work, `sweep-${chunkSize}`);
        const store = await PackChunkStore.open(dir);
        const keys = generateLineageKeys();
        const imp = await timed(() => importImage(image, { store, keys, chunkSize }));
        const sent: number[] = [];
        for (const [i, offsets] of writes.entries()) {
          const disk = await VaultDisk.open({ stateDir: join(dir, `state-${i}`), store, keys, base: imp.value.manifest, autoFlushMs: 0 });
          for (const off of offsets) await disk.write(off, randomBytes(65536));
          await disk.flush();
          let bytes = 0;
          for (const c of diffManifests(imp.value.manifest, disk.currentManifest())) if (c.to) bytes += (await store.get(c.to))!.length + FRAME;
          sent.push(bytes);
          await disk.close();
        }
        const s = stats(sent);
        const label = `${chunkSize / 1024} KiB chunks`;
        rows.push({ section: 'sweep', name: `${label}: check-in bytes`, value: s.median / MB, unit: 'MB', runs: s.runs, spread: s.spread,
          note: `manifest ${(encodeManifest(imp.value.manifest).length / 1024).toFixed(0)} KiB; import ${(size / imp.seconds / MB).toFixed(0)} MB/s; ${(s.median / (size * 0.01)).toFixed(2)}× the bytes written${chunkSize === 256 * 1024 ? ' — the default' : ''}` });
        await store.close();
        await rm(dir, { recursive: true, force: true });
      }
      await rm(image, { force: true });
      return rows;
    },
  };
}
