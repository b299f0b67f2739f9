import type { FastifyPluginAsync } from 'fastify';
import { z } from 'zod';
import type { BrokerContext } from '../../context.js';
import { parse } from '../../http.js';
import { userOf } from './user-scope.js';
import { entitledDesktop } from './desktop-scope.js';
import { restore, restoreRefusal } from '../../desktops/restore-points.js';
import { restorePoints } from '../../desktops/restore-point-list.js';

/**
 * Restore points: an admin makes one the desktop's current version; a user may, where policy
 * `restoreAllowed` says so, make one the version their next check-out starts from.
 */
export const restoreRoutes: FastifyPluginAsync<{ ctx: BrokerContext }> = async (app, { ctx }) => {
  // Administrators list and restore any desktop's points here too (the console, `admin desktops restore-points`).
  const adminsToo = { config: { adminsToo: true } };
  app.get('/v1/desktops/:id/restore-points', adminsToo, async (req) => {
    const claims = userOf(req);
    const d = entitledDesktop(req);
    const refusal = await restoreRefusal(ctx, claims.sub, claims.role, d);
    return { desktopId: d.id, restorePoints: await restorePoints(ctx, d), canRestore: !refusal, ...(refusal ? { reason: refusal.message } : {}) };
  });
  app.post('/v1/desktops/:id/restore', adminsToo, async (req) => {
    const claims = userOf(req);
    const d = entitledDesktop(req);
    const b = parse(z.object({ snapshotId: z.string().min(1).max(200), reason: z.string().max(500).optional() }).strict(), req.body);
    return await restore(ctx, claims.sub, claims.role, d, b.snapshotId, b.reason);
  });
};
