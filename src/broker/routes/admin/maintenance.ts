import type { FastifyPluginAsync } from 'fastify';
import { recordDamagedChunks } from '../../desktops/damage.js';
import { z } from 'zod';
import { collectGarbage, DEFAULT_GC } from '../../gc/collect.js';
import { verifyStore } from '../../gc/verify.js';
import type { BrokerContext } from '../../context.js';
import { HttpError, parse } from '../../http.js';
import { adminOf } from './admin-scope.js';
import { desktopRetention, setDesktopRetention } from '../../gc/retention.js';

const GcBody = z.object({
  dryRun: z.boolean().default(false),
  keepLast: z.number().int().min(1).max(100_000).default(DEFAULT_GC.keepLast),
  keepReplicaDays: z.number().min(0).max(36_500).default(DEFAULT_GC.keepReplicaDays),
  graceHours: z.number().min(0).max(24 * 365).default(DEFAULT_GC.graceMs / 3600_000),
  compactThreshold: z.number().min(0.01).max(1).default(DEFAULT_GC.compactThreshold),
}).strict();

const RetentionBody = z.union([
  z.object({ keepLast: z.number().int().min(1).max(100_000), keepReplicaDays: z.number().min(0).max(36_500) }).strict(),
  z.object({ reset: z.literal(true) }).strict(),
]);

const VerifyBody = z.object({ samplePercent: z.number().gt(0).max(100).default(100) }).strict();

/** Datacenter maintenance: garbage collection and scrub of the chunk store. */
export const maintenanceRoutes: FastifyPluginAsync<{ ctx: BrokerContext }> = async (app, { ctx }) => {
  app.post('/v1/admin/gc', async (req) => {
    const actor = adminOf(req);
    const b = parse(GcBody, req.body);
    try {
      const report = await collectGarbage(ctx.meta, ctx.store, { dryRun: b.dryRun, keepLast: b.keepLast, keepReplicaDays: b.keepReplicaDays, graceMs: b.graceHours * 3600_000, compactThreshold: b.compactThreshold });
      await ctx.audit({ actor, action: b.dryRun ? 'gc-dry-run' : 'gc', outcome: 'ok', detail: `${report.snapshots.deleted.length} snapshots, ${report.blobs.swept} blobs (${report.blobs.sweptBytes} bytes) swept, ${report.packs.compacted} packs compacted, ${report.packs.dropped} dropped, ${report.reclaimedBytes} bytes reclaimed` });
      return { report };
    } catch (err) {
      await ctx.audit({ actor, action: 'gc', outcome: 'failed', detail: (err as Error).message.slice(0, 300) });
      throw err;
    }
  });

  // A desktop's own retention (else the values of each GC run apply).
  app.get('/v1/admin/desktops/:id/retention', async (req) => {
    const d = await ctx.meta.getDesktop(parse(z.object({ id: z.string().max(200) }), req.params).id);
    if (!d) throw new HttpError(404, 'not-found', 'no such desktop');
    return { retention: await desktopRetention(ctx.meta, d.id) };
  });
  app.put('/v1/admin/desktops/:id/retention', async (req) => {
    const actor = adminOf(req);
    const d = await ctx.meta.getDesktop(parse(z.object({ id: z.string().max(200) }), req.params).id);
    if (!d) throw new HttpError(404, 'not-found', 'no such desktop');
    const b = parse(RetentionBody, req.body);
    const r = 'reset' in b ? null : b;
    await setDesktopRetention(ctx.meta, d.id, r);
    await ctx.audit({ actor, desktopId: d.id, action: 'retention-set', outcome: 'ok', detail: r ? `keep last ${r.keepLast}, replicas ${r.keepReplicaDays} days` : 'reset to the GC run values' });
    return { retention: r };
  });

  app.post('/v1/admin/verify', async (req) => {
    const actor = adminOf(req);
    const b = parse(VerifyBody, req.body);
    const report = await verifyStore(ctx.meta, ctx.store, ctx.secrets.masterKey, { samplePercent: b.samplePercent });
    await ctx.audit({ actor, action: 'verify', outcome: report.damagedCount || report.damagedSnapshots.length ? 'failed' : 'ok', detail: `${report.chunksChecked} of ${report.chunksReferenced} chunks read, ${report.damagedCount} damaged, ${report.damagedSnapshots.length} snapshots damaged` });
    // Damaged chunks are remembered: check-outs of the snapshots they break are refused (a full run replaces the list).
    await recordDamagedChunks(ctx, report.damaged.map((d) => ({ id: d.id, detail: `${d.problem}: ${d.detail} (admin verify by ${actor})` })), { replaceAll: b.samplePercent === undefined || b.samplePercent >= 100 });
    for (const s of report.damagedSnapshots) await ctx.audit({ actor, desktopId: s.desktopId, action: 'snapshot-damaged', outcome: 'failed', detail: `${s.id} (${s.kind}, ${s.createdAt}): ${s.badChunks} bad chunks${s.manifestProblem ? `; ${s.manifestProblem}` : ''}` });
    return { report };
  });
};
