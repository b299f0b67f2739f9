import type { Command } from 'commander';
import { z } from 'zod';
import { CarryonError } from '../../core/errors.js';
import { withAdmin } from './admin-shared.js';
import { formatBytes, printJsonOr, table } from '../common.js';

const Report = z.record(z.string(), z.unknown());
type Json = Record<string, unknown>;

const num = (name: string, min: number, max: number) => (v: string) => {
  const n = Number(v.replace(/%$/, ''));
  if (!Number.isFinite(n) || n < min || n > max) throw new CarryonError('invalid', `${name} must be a number from ${min} to ${max}, got ${v}`);
  return n;
};

/** `carryon admin gc` and `carryon admin verify`: datacenter chunk-store maintenance. */
export function registerMaintenanceCommands(program: Command): void {
  const admin = program.commands.find((c) => c.name() === 'admin');
  if (!admin) throw new Error('register the admin commands first');

  admin.command('gc').description('garbage collection: apply snapshot retention, sweep unreferenced blobs (after a grace period), compact packs')
    .option('--dry-run', 'report what would be deleted and reclaimed; change nothing')
    .option('--keep-last <n>', 'snapshots kept per desktop (besides pinned ones)', num('--keep-last', 1, 100_000))
    .option('--keep-replica-days <d>', 'also keep every replica younger than this', num('--keep-replica-days', 0, 36_500))
    .option('--grace-hours <h>', 'never sweep a blob used more recently than this (longer than any transfer)', num('--grace-hours', 0, 24 * 365))
    .option('--compact-threshold <share>', 'rewrite a pack once this share of it is dead (0.01–1)', num('--compact-threshold', 0.01, 1))
    .action(async (o: { dryRun?: boolean; keepLast?: number; keepReplicaDays?: number; graceHours?: number; compactThreshold?: number }, cmd: Command) => {
      await withAdmin(cmd, async (b, g) => {
        const { report } = await b.call('POST', '/v1/admin/gc', { dryRun: Boolean(o.dryRun), keepLast: o.keepLast, keepReplicaDays: o.keepReplicaDays, graceHours: o.graceHours, compactThreshold: o.compactThreshold }, z.object({ report: Report }));
        printJsonOr(Boolean(g.json), report, () => {
          const r = report as { dryRun: boolean; seconds: number; cutoff: string; snapshots: { kept: number; deleted: Json[] }; blobs: Json & { sweptBytes: number }; packs: Json & { freedBytes: number }; manifests?: { total: number; deleted: number }; reclaimedBytes: number };
          const verb = r.dryRun ? 'to delete' : 'deleted';
          process.stdout.write(`${r.dryRun ? 'dry run: nothing changed\n' : ''}snapshots: ${r.snapshots.kept} kept, ${r.snapshots.deleted.length} ${verb}\n`);
          if (r.snapshots.deleted.length) table(r.snapshots.deleted, ['id', 'desktopId', 'kind', 'createdAt']);
          process.stdout.write(`blobs: ${String(r.blobs.total)} total, ${String(r.blobs.referenced)} referenced, ${String(r.blobs.spared)} spared (used since ${r.cutoff}, the grace period), ${String(r.blobs.swept)} ${r.dryRun ? 'to sweep' : 'swept'} (${formatBytes(r.blobs.sweptBytes)})\n`);
          if (r.manifests) process.stdout.write(`manifests: ${r.manifests.total} total, ${r.manifests.deleted} ${r.dryRun ? 'to delete' : 'deleted'}\n`);
          process.stdout.write(`packs: ${String(r.packs.total)} total, ${String(r.packs.compacted)} ${r.dryRun ? 'to compact' : 'compacted'}, ${String(r.packs.dropped)} ${r.dryRun ? 'to delete' : 'deleted'}; ${formatBytes(Math.max(0, r.reclaimedBytes))} ${r.dryRun ? 'reclaimable' : 'reclaimed'} in ${r.seconds.toFixed(1)} s\n`);
        });
      });
    });

  admin.command('retention <desktop>').description("a desktop's own snapshot retention for garbage collection (without options: show it)")
    .option('--keep-last <n>', 'snapshots kept (besides pinned ones)', num('--keep-last', 1, 100_000))
    .option('--keep-replica-days <d>', 'also keep every replica younger than this', num('--keep-replica-days', 0, 36_500))
    .option('--reset', "back to each GC run's values")
    .action(async (desktop: string, o: { keepLast?: number; keepReplicaDays?: number; reset?: boolean }, cmd: Command) => {
      await withAdmin(cmd, async (b, g) => {
        const path = `/v1/admin/desktops/${encodeURIComponent(desktop)}/retention`;
        const Res = z.object({ retention: z.object({ keepLast: z.number(), keepReplicaDays: z.number() }).nullable() });
        let res;
        if (o.reset) res = await b.call('PUT', path, { reset: true }, Res);
        else if (o.keepLast !== undefined || o.keepReplicaDays !== undefined) {
          if (o.keepLast === undefined || o.keepReplicaDays === undefined) throw new CarryonError('invalid', 'give both --keep-last and --keep-replica-days');
          res = await b.call('PUT', path, { keepLast: o.keepLast, keepReplicaDays: o.keepReplicaDays }, Res);
        } else res = await b.call('GET', path, undefined, Res);
        const r = res.retention;
        printJsonOr(Boolean(g.json), res, () => process.stdout.write(r ? `${desktop}: keep the last ${r.keepLast} snapshots and replicas younger than ${r.keepReplicaDays} days\n` : `${desktop}: each GC run's retention applies\n`));
      });
    });

  admin.command('verify').description('scrub: re-read referenced blobs, authenticate each (AES-GCM, then HMAC = ID), report damaged snapshots')
    .option('--sample <percent>', 'read only this share of the chunks, e.g. 10%', num('--sample', 0.001, 100))
    .action(async (o: { sample?: number }, cmd: Command) => {
      await withAdmin(cmd, async (b, g) => {
        const { report } = await b.call('POST', '/v1/admin/verify', { samplePercent: o.sample ?? 100 }, z.object({ report: Report }));
        const r = report as { seconds: number; chunksChecked: number; chunksReferenced: number; bytesChecked: number; damagedCount: number; damaged: Json[]; damagedSnapshots: Json[]; snapshotsChecked: number };
        printJsonOr(Boolean(g.json), report, () => {
          process.stdout.write(`read ${r.chunksChecked} of ${r.chunksReferenced} referenced chunks (${formatBytes(r.bytesChecked)}) of ${r.snapshotsChecked} snapshots in ${r.seconds.toFixed(1)} s: ${r.damagedCount} damaged\n`);
          if (r.damaged.length) table(r.damaged, ['id', 'problem', 'detail']);
          if (r.damagedSnapshots.length) {
            process.stdout.write('damaged snapshots:\n');
            table(r.damagedSnapshots, ['id', 'desktop', 'kind', 'createdAt', 'badChunks', 'manifestProblem']);
          }
        });
        if (r.damagedCount || r.damagedSnapshots.length) process.exitCode = 3;
      });
    });
}
