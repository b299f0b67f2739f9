import { rm } from 'node:fs/promises';
import { join } from 'node:path';
import { checkout, release, upload } from '../src/client/ops.js';
import { writeTestImage } from '../src/demo/image.js';
import { changeOnePercent, cliRun, phaseNote } from './checkin.js';
import { MB, run, settle, stats, timed } from './lib/measure.js';
import { Rig } from './lib/rig.js';
import type { BenchRow, BenchSection } from './types.js';

/**
 * The check-out after the laptop checked the desktop in (or rolled it back) and someone else
 * changed it on the server: the laptop's parked copy (client/parked.ts) is the base, so only the
 * changed chunks travel. Peer: rsync updating the previous copy in place (delta mode).
 */
export function secondCheckoutSection(work: string, sizeGiB: number, changeGiB: number): BenchSection {
  return {
    name: `Second check-out of a ${sizeGiB} GiB desktop after ${(changeGiB * 1024).toFixed(0)} MiB changed on the server (parked copy) vs rsync`,
    async run() {
      const rows: BenchRow[] = [];
      const size = sizeGiB * 2 ** 30;
      const dir = join(work, `second-${sizeGiB}`);
      const image = join(work, `second-${sizeGiB}.raw`);
      // rsync's previous copy (what the laptop parked) and the server's current state.
      const prev = join(work, `second-prev-${sizeGiB}.raw`);
      const src = join(work, `second-src-${sizeGiB}.raw`);
      await writeTestImage(image, size, 'mixed');
      // desk-1: a clone of the first image, never checked out here (the sibling row below).
      const rig = await Rig.start(dir, image, undefined, { desktops: 2 });
      try {
        const label = `${sizeGiB} GiB mixed image`;
        const mine = await rig.laptop();
        const other = await rig.laptop();
        let before = (await rig.wire()).bytesOut;
        await settle();
        const first = await timed(() => checkout(mine, 'desk'));
        const firstBytes = (await rig.wire()).bytesOut - before;
        await release(mine, 'desk', 'rollback'); // parked: the base equals the checkpoint
        await run('cp', ['--sparse=always', image, prev]);
        await run('cp', ['--sparse=always', image, src]);
        const ours: number[] = [];
        const wire: number[] = [];
        const chunks: number[] = [];
        const theirs: number[] = [];
        for (let i = 0; i < 3; i++) {
          // Someone else changes the desktop on the server (their own check-out, 1% of 64 KiB writes, check-in).
          await checkout(other, 'desk');
          await changeOnePercent(other, src, size, changeGiB * 2 ** 30, 'random');
          await upload(other, 'desk', 'checkin');
          before = (await rig.wire()).bytesOut;
          await settle();
          const { seconds, value } = await timed(() => checkout(mine, 'desk'));
          ours.push(seconds);
          wire.push((await rig.wire()).bytesOut - before);
          chunks.push(value.chunksMoved);
          await release(mine, 'desk', 'rollback');
          await settle();
          theirs.push((await timed(() => run('rsync', ['--inplace', '--no-whole-file', '--ignore-times', src, prev], { maxBuffer: 1 << 20 }))).seconds);
        }
        // The same as a user runs it: `carryon checkout` from process start to exit, the vault key at
        // its real cost (the rows above run in-process at the bench's lowered cost). The parked copy
        // those left is refused at that cost, so a first CLI round (not counted) fetches everything.
        const cli: { seconds: number; spans: Parameters<typeof phaseNote>[0] }[] = [];
        for (let i = -1; i < 3; i++) {
          if (i >= 0) {
            await checkout(other, 'desk');
            await changeOnePercent(other, src, size, changeGiB * 2 ** 30, 'random');
            await upload(other, 'desk', 'checkin');
          }
          await settle();
          const r = await cliRun(mine, ['checkout', 'desk']);
          if (i >= 0) cli.push(r);
          await cliRun(mine, ['rollback', 'desk']);
        }
        // A clone checked out on the laptop that holds desk parked: what they share is copied locally, only the rest travels.
        before = (await rig.wire()).bytesOut;
        await settle();
        const sib = await timed(() => checkout(mine, 'desk-1'));
        const sibBytes = (await rig.wire()).bytesOut - before;
        await release(mine, 'desk-1', 'rollback');
        const t = stats(ours);
        const b = stats(wire);
        const c = stats(chunks);
        const rt = stats(theirs);
        const perChunk = b.median / (c.median * 256 * 1024);
        rows.push({ section: 'second', name: `second check-out, ${label}: wall time`, value: t.median, unit: 's', runs: t.runs, spread: t.spread,
          peer: { name: 'rsync --inplace --no-whole-file (previous copy)', value: rt.median, unit: 's' },
          note: `first check-out ${first.seconds.toFixed(2)} s: ${(first.seconds / t.median).toFixed(1)}× faster (target ≥ 10: ${first.seconds / t.median >= 10 ? 'met' : 'MISSED'}); ${(rt.median / t.median).toFixed(1)}× faster than rsync (target ≥ 5: ${rt.median / t.median >= 5 ? 'met' : 'MISSED'})` });
        const ct = stats(cli.map((r) => r.seconds));
        const cm = cli.find((r) => r.seconds === ct.median) ?? cli[0]!;
        rows.push({ section: 'second', name: `second check-out, end to end (\`carryon checkout\` from process start to exit), ${label}: wall time`, value: ct.median, unit: 's', runs: ct.runs, spread: ct.spread,
          peer: { name: 'rsync --inplace --no-whole-file (previous copy)', value: rt.median, unit: 's' },
          note: `${(rt.median / ct.median).toFixed(1)}× faster than rsync; first check-out (in-process) ${(first.seconds / ct.median).toFixed(1)}×; phases of the median run, ms (CARRYON_TRACE=1; overlapping spans run side by side): ${phaseNote(cm.spans)}` });
        rows.push({ section: 'second', name: `second check-out, ${label}: bytes on the wire`, value: b.median / MB, unit: 'MB', runs: b.runs, spread: b.spread,
          note: `${c.median} changed chunks fetched (of a first check-out's ${(firstBytes / MB).toFixed(0)} MB); ${perChunk.toFixed(3)}× their 256 KiB each (target ≤ 1.05: ${perChunk <= 1.05 ? 'met' : 'MISSED'})` });
        rows.push({ section: 'second', name: `check-out of a clone of the parked desktop, ${label}: wall time`, value: sib.seconds, unit: 's', runs: 1, spread: 0,
          note: `${sib.value.copiedChunks} chunks copied from the parked copy, ${sib.value.chunksMoved} fetched (${(sibBytes / MB).toFixed(1)} MB: those changed in desk since the clone was made); first check-out ${first.seconds.toFixed(2)} s: ${(first.seconds / sib.seconds).toFixed(1)}× faster` });
      } finally {
        await rig.close();
        await rm(dir, { recursive: true, force: true, maxRetries: 5 });
        for (const f of [image, prev, src]) await rm(f, { force: true });
      }
      return rows;
    },
  };
}
