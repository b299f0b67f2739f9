import { randomBytes, randomUUID } from 'node:crypto';
import { rm } from 'node:fs/promises';
import { join } from 'node:path';
import { collectGarbage } from '../src/broker/gc/collect.js';
import { sealChunk } from '../src/core/chunks/blob.js';
import { generateLineageKeys, wrapLineageKeys } from '../src/core/keys.js';
import { createManifest, encodeManifest, manifestDigest } from '../src/core/chunks/manifest.js';
import { writeTestImage } from '../src/demo/image.js';
import { importImage } from '../src/import/import.js';
import { openMetadata } from '../src/broker/db/open.js';
import { PackChunkStore } from '../src/store/pack-chunk-store.js';
import { MB, settle, timed } from './lib/measure.js';
import type { BenchSection } from './types.js';

const SNAPSHOTS = 20;
const KEEP = 5;
const CHANGE = 0.05;

/**
 * Garbage collection of one desktop with 20 snapshots (import + 19 check-ins, each rewriting 5%
 * of the chunks with new data), keeping the last 5: retention, mark, sweep, compaction.
 */
export function gcSection(work: string, sizeGiB: number): BenchSection {
  return {
    name: `Garbage collection: a ${sizeGiB} GiB desktop with ${SNAPSHOTS} snapshots, keep the last ${KEEP}`,
    async run() {
      const dir = join(work, 'gc');
      const image = join(work, 'gc.raw');
      const size = Math.round(sizeGiB * 2 ** 30);
      await writeTestImage(image, size, 'mixed');
      const store = await PackChunkStore.open(join(dir, 'chunks'), { touchSlackMs: 0 });
      const { meta, sql } = await openMetadata({ dataDir: dir, auditKey: randomBytes(32) });
      try {
        const keys = generateLineageKeys();
        const lineageId = randomUUID();
        await meta.createLineage(wrapLineageKeys(randomBytes(32), keys, `lineage:${lineageId}`), lineageId);
        const imp = await importImage(image, { store, keys });
        await rm(image, { force: true });
        const desktopId = await meta.createDesktop({ name: 'gc', poolId: null, lineageId, config: { vcpus: 1, ramMiB: 512, minRamMiB: 256, nic: 'none', usb: false, disks: [] } });
        const chunks = [...imp.manifest.chunks];
        const chunkSize = imp.manifest.chunkSize;
        let parent = await meta.createSnapshot({ desktopId, parentId: null, kind: 'import', disks: [{ name: 'disk0', digest: imp.digest, sizeBytes: size, chunkSize }] });
        for (let s = 1; s < SNAPSHOTS; s++) {
          for (let n = 0; n < chunks.length * CHANGE; n++) {
            const sealed = sealChunk(keys, randomBytes(chunkSize));
            await store.put(sealed.id, sealed.blob, { defer: true });
            chunks[Math.floor(Math.random() * chunks.length)] = sealed.id;
          }
          await store.sync();
          const m = createManifest(chunkSize, size, [...chunks]);
          await store.putManifest(manifestDigest(m), encodeManifest(m));
          parent = await meta.createSnapshot({ desktopId, parentId: parent, kind: 'checkin', disks: [{ name: 'disk0', digest: manifestDigest(m), sizeBytes: size, chunkSize }] });
        }
        await meta.setDesktopSnapshot(desktopId, parent);
        const opts = { keepLast: KEEP, keepReplicaDays: 0, graceMs: 0, compactThreshold: 0.3 };
        await settle();
        const dry = await timed(() => collectGarbage(meta, store, { ...opts, dryRun: true }));
        await settle();
        const real = await timed(() => collectGarbage(meta, store, opts));
        const r = real.value;
        const usage = await store.packUsage();
        return [
          { section: 'gc', name: `gc dry run (${r.blobs.total} blobs, ${SNAPSHOTS} snapshots)`, value: dry.seconds, unit: 's', runs: 1, spread: 0, note: `predicts ${(dry.value.reclaimedBytes / MB).toFixed(0)} MB reclaimable` },
          { section: 'gc', name: `gc: retention, mark, sweep, compaction (keep last ${KEEP})`, value: real.seconds, unit: 's', runs: 1, spread: 0,
            note: `${r.snapshots.deleted.length} snapshots and ${r.blobs.swept} blobs deleted; ${r.packs.compacted} packs compacted (${(r.packs.movedBytes / MB).toFixed(0)} MB rewritten), ${r.packs.dropped} deleted` },
          { section: 'gc', name: 'bytes reclaimed by gc', value: r.reclaimedBytes / MB, unit: 'MB', runs: 1, spread: 0, note: `store now ${(usage.packBytes / MB).toFixed(0)} MB in ${usage.packs} packs, ${(usage.liveBytes / MB).toFixed(0)} MB live` },
        ];
      } finally {
        await store.close();
        await sql.close();
        await rm(dir, { recursive: true, force: true });
      }
    },
  };
}
