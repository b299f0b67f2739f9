import { writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { checkout, upload } from '../src/client/ops.js';
import { writeTestImage } from '../src/demo/image.js';
import { freshDatabase, startPostgres } from '../test/support/postgres.js';
import { startSwift } from '../test/support/swift.js';
import { changeOnePercent } from './checkin.js';
import { settle, timed } from './lib/measure.js';
import { Rig, type RigOptions } from './lib/rig.js';
import type { BenchRow, BenchSection } from './types.js';

/**
 * The same check-out and check-in on the embedded engines (SQLite, local pack store) and on the
 * scale-out ones (PostgreSQL, an S3 store on a real OpenStack Swift), all on this box.
 */
export function enginesSection(work: string, sizeGiB: number, changeGiB: number): BenchSection {
  return {
    name: `Check-out and check-in of a ${sizeGiB} GiB desktop on PostgreSQL + S3 (Swift) next to SQLite + local packs`,
    async run() {
      const size = sizeGiB * 2 ** 30;
      const image = join(work, `engines-${sizeGiB}.raw`);
      await writeTestImage(image, size, 'mixed');
      const pg = await startPostgres();
      const swift = await startSwift();
      // The S3 store (broker and transfer-server processes) takes its keys from the usual AWS variables.
      const saved = { id: process.env.AWS_ACCESS_KEY_ID, secret: process.env.AWS_SECRET_ACCESS_KEY };
      process.env.AWS_ACCESS_KEY_ID = swift.accessKeyId;
      process.env.AWS_SECRET_ACCESS_KEY = swift.secretAccessKey;
      try {
        const measure = async (name: string, opts: RigOptions) => {
          const rig = await Rig.start(join(work, `engines-${name}`), image, undefined, opts);
          try {
            const env = await rig.laptop();
            await settle();
            const co = await timed(() => checkout(env, 'desk'));
            const raw = join(work, `engines-${name}-scratch.raw`);
            await writeFile(raw, Buffer.alloc(0));
            await changeOnePercent(env, raw, size, changeGiB * 2 ** 30, 'random');
            await settle();
            const ci = await timed(() => upload(env, 'desk', 'checkin'));
            return { checkout: co.seconds, checkin: ci.seconds };
          } finally {
            await rig.close();
          }
        };
        const local = await measure('sqlite', {});
        const scaled = await measure('pg-s3', {
          database: await freshDatabase(pg.url),
          chunkStore: `s3://carryon-bench/desk?endpoint=${encodeURIComponent(swift.endpoint)}&region=${swift.region}&create=true`,
        });
        const label = `${sizeGiB} GiB mixed image, PostgreSQL + S3 (Swift)`;
        const rows: BenchRow[] = [
          { section: 'engines', name: `check-out, ${label}: wall time`, value: scaled.checkout, unit: 's', runs: 1, spread: 0, peer: { name: 'SQLite + local packs', value: local.checkout, unit: 's' }, note: `${(scaled.checkout / local.checkout).toFixed(2)}× the embedded engines' time` },
          { section: 'engines', name: `check-in after ${Math.round(changeGiB * 1024)} MiB of random 64 KiB writes, ${label}: wall time`, value: scaled.checkin, unit: 's', runs: 1, spread: 0, peer: { name: 'SQLite + local packs', value: local.checkin, unit: 's' }, note: `${(scaled.checkin / local.checkin).toFixed(2)}× the embedded engines' time` },
        ];
        return rows;
      } finally {
        process.env.AWS_ACCESS_KEY_ID = saved.id;
        process.env.AWS_SECRET_ACCESS_KEY = saved.secret;
        if (saved.id === undefined) delete process.env.AWS_ACCESS_KEY_ID;
        if (saved.secret === undefined) delete process.env.AWS_SECRET_ACCESS_KEY;
        await swift.stop();
        await pg.stop();
      }
    },
  };
}
