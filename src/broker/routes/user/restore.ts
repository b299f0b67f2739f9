import type { FastifyPluginAsync } from 'fastify';
import { z } from 'zod';
import type { BrokerContext } from '../../context.js';
import { HttpError, parse } from '../../http.js';
import { userOf } from './user-scope.js';
import { restore, restoreRefusal } from '../../desktops/restore-points.js';
import { restorePoints } from '../../desktops/restore-point-list.js';

const Id = z.object({ id: z.string().min(1).max(200) });

/**
 * Restore points: an admin makes one the desktop's current version; a user may, where policy
 * `restoreAllowed` says so, make one the version their next check-out starts from.
 */
export const restoreRoutes: FastifyPluginAsync<{ ctx: BrokerContext }> = async (app, { ctx }) => {
  const desktopFor = async (claims: { sub: string; role: string }, ref: string) => {
    const d = await ctx.meta.getDesktop(ref);
    if (!d || (claims.role !== 'admin' && !await ctx.meta.isEntitled(claims.sub, d))) throw new HttpError(404, 'not-found', `no desktop ${ref}${claims.role === 'admin' ? '' : ' you are entitled to'}`);
    return d;
  };
  app.get('/v1/desktops/:id/restore-points', async (req) => {
    const claims = userOf(req);
    const d = await desktopFor(claims, parse(Id, req.params).id);
    const refusal = await restoreRefusal(ctx, claims.sub, claims.role, d);
    return { desktopId: d.id, restorePoints: await restorePoints(ctx, d), canRestore: !refusal, ...(refusal ? { reason: refusal.message } : {}) };
  });
  app.post('/v1/desktops/:id/restore', async (req) => {
    const claims = userOf(req);
    const d = await desktopFor(claims, parse(Id, req.params).id);
    const b = parse(z.object({ snapshotId: z.string().min(1).max(200), reason: z.string().max(500).optional() }).strict(), req.body);
    return await restore(ctx, claims.sub, claims.role, d, b.snapshotId, b.reason);
  });
};
