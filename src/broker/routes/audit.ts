import type { FastifyPluginAsync } from 'fastify';
import { z } from 'zod';
import { eventsCsv } from '../../core/audit-csv.js';
import type { BrokerContext } from '../context.js';
import { parse } from '../http.js';

/** The audit trail newest first, filtered, as JSON or a CSV download. */
export const auditRoutes: FastifyPluginAsync<{ ctx: BrokerContext }> = async (app, { ctx }) => {
  app.get('/v1/admin/audit', async (req, reply) => {
    const q = parse(z.object({
      before: z.coerce.number().int().min(1).optional(), limit: z.coerce.number().int().min(1).max(100_000).optional(),
      desktop: z.string().max(200).optional(), actor: z.string().max(200).optional(), action: z.string().max(100).optional(),
      outcome: z.enum(['ok', 'denied', 'failed', 'info']).optional(), q: z.string().max(200).optional(), format: z.enum(['json', 'csv']).optional(),
    }), req.query);
    const desktopId = q.desktop ? ((await ctx.meta.getDesktop(q.desktop))?.id ?? q.desktop) : undefined;
    const events = await ctx.meta.listEventsNewest({ beforeId: q.before, desktopId, actor: q.actor, action: q.action, outcome: q.outcome, text: q.q, limit: q.limit ?? (q.format === 'csv' ? 100_000 : 200) });
    if (q.format === 'csv') {
      return reply.type('text/csv; charset=utf-8').header('content-disposition', `attachment; filename="carryon-audit-${new Date().toISOString().slice(0, 19).replace(/:/g, '')}.csv"`).send(eventsCsv(events));
    }
    return { events };
  });
};
