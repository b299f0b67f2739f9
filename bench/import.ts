import { rmSync } from 'node:fs';
import { rm } from 'node:fs/promises';
import type { ChunkStore } from '../src/store/chunk-store.js';
import { join } from 'node:path';
import { generateLineageKeys } from '../src/core/keys.js';
import { writeTestImage } from '../src/demo/image.js';
import { importImage } from '../src/import/import.js';
import { PackChunkStore } from '../src/store/pack-chunk-store.js';
import { MB, nodeCryptoSpeed, opensslSpeed, readSpeed, repeat, run, settle, timed } from './lib/measure.js';
import type { BenchRow, BenchSection } from './types.js';

export function importSection(work: string, sizeGiB: number): BenchSection {
  return {
    name: 'Import pipeline (zero check, HMAC-SHA-256 ID, zstd-1, AES-256-GCM, pack store with group commit)',
    async run() {
      const sha = await opensslSpeed('sha256');
      const aes = await opensslSpeed('aes-256-gcm');
      const rows: BenchRow[] = [
        { section: 'limits', name: 'openssl speed sha256, 256 KiB blocks, one core', value: sha / MB, unit: 'MB/s', runs: 1, spread: 0 },
        { section: 'limits', name: 'openssl speed aes-256-gcm, 256 KiB blocks, one core', value: aes / MB, unit: 'MB/s', runs: 1, spread: 0 },
      ];
      for (const alg of ['hmac-sha256', 'aes-256-gcm', 'aes-256-gcm-decrypt'] as const) {
        const r = await repeat(3, async () => nodeCryptoSpeed(alg) / MB);
        const peer = alg === 'hmac-sha256' ? { name: 'openssl speed sha256', value: sha / MB } : { name: 'openssl speed aes-256-gcm', value: aes / MB };
        rows.push({ section: 'limits', name: `Node's own ${alg}, 256 KiB messages, one core (the runtime's limit)`, value: r.median, unit: 'MB/s', runs: r.runs, spread: r.spread, peer: { ...peer, unit: 'MB/s' }, note: `${((100 * r.median) / peer.value).toFixed(0)}% of the system OpenSSL` });
      }
      for (const kind of ['random', 'mixed'] as const) {
        const image = join(work, `import-${kind}.raw`);
        const bytes = sizeGiB * 2 ** 30;
        await writeTestImage(image, bytes, kind);
        const raw = await readSpeed(image);
        // Compute pipeline alone (sink discards blobs): what the cores can do.
        const sink: ChunkStore = { put: async () => true, sync: async () => undefined, putManifest: async () => undefined, delete: async () => undefined } as unknown as ChunkStore;
        await settle();
        let used = 0; // the worker count importImage really used (one per core, bounded)
        const p = await repeat(3, async () => {
          const r = await timed(() => importImage(image, { store: sink, keys: generateLineageKeys() }));
          used = r.value.workers;
          const v = bytes / r.seconds / MB;
          if (process.env.BENCH_DEBUG) process.stderr.write(`seal-only run: ${v.toFixed(0)} MB/s, ${used} workers\n`);
          return v;
        }, { warmup: 1 });
        rows.push({
          section: 'pipeline', name: `seal pipeline only, ${sizeGiB} GiB ${kind} image, ${used} workers`, value: p.median, unit: 'MB/s', runs: p.runs, spread: p.spread,
          peer: { name: 'openssl sha256 (1 core)', value: sha / MB, unit: 'MB/s' },
          note: `${((100 * p.median * MB) / sha).toFixed(0)}% of single-core SHA-256 (target ≥ 50%, goal 70%)`,
        });
        const disk = await repeat(3, async () => {
          const out = join(work, 'dd.out');
          const { seconds } = await timed(() => run('dd', ['if=/dev/zero', `of=${out}`, 'bs=4M', `count=${Math.round(bytes / (4 << 20) / 2)}`, 'conv=fsync']));
          await rm(out, { force: true });
          return bytes / 2 / seconds / MB;
        });
        const s = await repeat(3, async (i) => {
          const dir = join(work, `import-store-${kind}-${i}`);
          const store = await PackChunkStore.open(dir);
          const { seconds, value } = await timed(() => importImage(image, { store, keys: generateLineageKeys() }));
          used = value.workers;
          await store.close();
          rmSync(dir, { recursive: true, force: true });
          return bytes / seconds / MB;
        });
        rows.push({
          section: 'import', name: `full import ${sizeGiB} GiB ${kind === 'random' ? 'incompressible' : 'mixed (½ zero, ¼ text, ¼ random)'} image, ${used} workers`,
          value: s.median, unit: 'MB/s', runs: s.runs, spread: s.spread,
          peer: { name: 'dd conv=fsync write of this disk', value: disk.median, unit: 'MB/s' },
          note: `into the pack chunk store, durable; raw read of the image ${(raw / MB).toFixed(0)} MB/s (page cache warm)`,
        });
        rmSync(image, { force: true });
      }
      return rows;
    },
  };
}
