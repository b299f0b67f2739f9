import type { FastifyPluginAsync } from 'fastify';
import { z } from 'zod';
import { beginUpload, commitUpload } from '../../checkouts.js';
import type { BrokerContext } from '../../context.js';
import { beginHandback, commitHandback } from '../../handback.js';
import { parse } from '../../http.js';
import { requireFreshLogin } from '../../auth/trust.js';
import { Changes, withReceipts } from '../change-list.js';
import { Id } from './host-facts.js';
import { userOf } from './user-scope.js';
import { heldCheckout } from './holder-scope.js';

/** Begin: nothing (the transfer server names the chunks; the commit carries the changes). */
const Begin = z.object({}).strict();
/** A replica may say it is the agent's (nobody waits for it): queued last, rebuilt in the idle class. */
const BeginReplica = z.object({ background: z.boolean().optional() }).strict();

/** A laptop's uploads: check-in, replica, and handing back the work of a check-out that ended (holder scope: the caller holds it). */
export const checkInRoutes: FastifyPluginAsync<{ ctx: BrokerContext }> = async (app, { ctx }) => {
  for (const kind of ['checkin', 'replicate'] as const) {
    app.post(`/v1/checkouts/:id/${kind}`, async (req) => {
      const c = heldCheckout(req);
      await requireFreshLogin(ctx, userOf(req), c.id, kind);
      const { background } = kind === 'replicate' ? parse(BeginReplica, req.body ?? {}) : parse(Begin, req.body ?? {});
      return await beginUpload(ctx, c, kind, { background: background === true });
    });
    app.post(`/v1/checkouts/:id/${kind}/commit`, async (req) => {
      const claims = userOf(req);
      const { changes, receipts } = withReceipts(parse(Changes, req.body ?? {}).disks);
      return await commitUpload(ctx, claims.sub, parse(Id, req.params).id, kind, changes, receipts);
    });
  }
  app.post('/v1/checkouts/:id/handback', async (req) => {
    const c = heldCheckout(req);
    await requireFreshLogin(ctx, userOf(req), c.id, 'handback');
    parse(Begin, req.body ?? {});
    return await beginHandback(ctx, c);
  });
  app.post('/v1/checkouts/:id/handback/commit', async (req) => {
    const claims = userOf(req);
    const { changes, receipts } = withReceipts(parse(Changes, req.body ?? {}).disks);
    return await commitHandback(ctx, claims.sub, parse(Id, req.params).id, changes, receipts);
  });
};
