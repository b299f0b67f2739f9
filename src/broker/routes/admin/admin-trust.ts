import type { FastifyPluginAsync } from 'fastify';
import { z } from 'zod';
import type { BrokerContext } from '../../context.js';
import { HttpError, parse } from '../../http.js';
import { adminOf } from './admin-scope.js';
import { revokeDevice } from '../../auth/trust.js';

const Id = z.object({ id: z.string().min(1).max(200) });

/** Admin: device revocation, and the audit trail's chain check and JSON-lines export. */
export const adminTrustRoutes: FastifyPluginAsync<{ ctx: BrokerContext }> = async (app, { ctx }) => {
  app.post('/v1/admin/devices/:id/revoke', async (req) => {
    const actor = adminOf(req);
    const { id } = parse(Id, req.params);
    if (!await ctx.meta.getDevice(id)) throw new HttpError(404, 'not-found', `no device ${id}`);
    const changed = await revokeDevice(ctx, actor, id);
    return { ok: true, alreadyRevoked: !changed };
  });

  app.get('/v1/admin/audit/verify', async (req) => {
    const actor = adminOf(req);
    const check = await ctx.meta.verifyAuditChain();
    await ctx.audit({ actor, action: 'audit-verify', outcome: check.ok ? 'ok' : 'failed', detail: check.ok ? `${check.events} events, head ${check.head}` : `broken at event ${check.brokenAt}: ${check.reason}` });
    return check;
  });

  app.get('/v1/admin/audit/export', async (req, reply) => {
    const actor = adminOf(req);
    const q = parse(z.object({ since: z.coerce.number().int().min(0).optional(), limit: z.coerce.number().int().min(1).max(1_000_000).optional() }), req.query);
    await ctx.audit({ actor, action: 'audit-export', outcome: 'ok', detail: `since ${q.since ?? 0}` });
    return reply.type('application/x-ndjson').send(await ctx.meta.exportEvents(q.since ?? 0, q.limit ?? 100_000));
  });
};
