import type { FastifyPluginAsync } from 'fastify';
import { z } from 'zod';
import { cancel, issueLease, markTransferred, rollback } from '../../checkouts.js';
import { HANDOVER_WAIT_MS, handoverOfCheckout } from '../../hosts/handover.js';
import type { BrokerContext } from '../../context.js';
import { checkoutOutcome } from '../../handback.js';
import { reportChunkFailure } from '../../desktops/damage.js';
import { HttpError, parse } from '../../http.js';
import { requireFreshLogin } from '../../auth/trust.js';
import { releaseUnlockShare } from '../../online-unlock.js';
import { userOf } from './user-scope.js';
import { heldCheckout } from './holder-scope.js';

/** A check-out's life cycle on the user's laptop, its uploads aside (check-ins.ts) (holder scope: the caller holds it). */
export const checkoutRoutes: FastifyPluginAsync<{ ctx: BrokerContext }> = async (app, { ctx }) => {
  // Without a query, where the handover stands now (older laptops poll it); with `after`, a long poll until that step moves.
  const Wait = z.object({ after: z.enum(['asked', 'shutting-down', 'sending', 'done', 'failed', 'cancelled']).optional(), waitMs: z.coerce.number().int().min(0).max(HANDOVER_WAIT_MS).default(HANDOVER_WAIT_MS) }).strict();
  app.get('/v1/checkouts/:id/handover', async (req, reply) => {
    const q = parse(Wait, req.query ?? {});
    if (!q.after) return await handoverOfCheckout(ctx, heldCheckout(req));
    const gone = new AbortController();
    // The response's close: the laptop went away (a request's own close may come as soon as its body was read).
    reply.raw.once('close', () => gone.abort());
    try {
      return await handoverOfCheckout(ctx, heldCheckout(req), { after: q.after, ms: q.waitMs, signal: gone.signal });
    } finally {
      gone.abort();
    }
  });
  app.post('/v1/checkouts/:id/transferred', async (req) => ({ checkout: await markTransferred(ctx, heldCheckout(req)) }));
  // A chunk the laptop could not authenticate (3 tries): checked against the store, audited, remembered when the store's copy is bad.
  app.post('/v1/checkouts/:id/damaged', async (req) => {
    const b = parse(z.object({ chunkId: z.string().max(100), detail: z.string().max(2000) }).strict(), req.body);
    return reportChunkFailure(ctx, heldCheckout(req), b.chunkId, b.detail);
  });
  app.post('/v1/checkouts/:id/cancel', async (req) => ({ checkout: await cancel(ctx, heldCheckout(req)) }));
  // Sensitive after an offline login: with requireOnlineReauth they need a recent password login.
  app.post('/v1/checkouts/:id/rollback', async (req) => {
    const c = heldCheckout(req);
    await requireFreshLogin(ctx, userOf(req), c.id, 'rollback');
    return { checkout: await rollback(ctx, c) };
  });
  // A check-out that ended while the laptop held work: what it made (handing the work back: check-ins.ts).
  app.get('/v1/checkouts/:id', async (req) => await checkoutOutcome(ctx, heldCheckout(req)));
  // The share that opens the vault's online wrap (online-unlock.ts): right after a password check, on the check-out's device.
  app.post('/v1/checkouts/:id/unlock', async (req) => releaseUnlockShare(ctx, userOf(req), heldCheckout(req)));
  app.post('/v1/checkouts/:id/lease', async (req) => {
    const claims = userOf(req);
    const c = heldCheckout(req);
    const lease = await issueLease(ctx, claims.sub, c.deviceId);
    if (!lease) throw new HttpError(409, 'wrong-state', 'no active checkout to lease');
    await ctx.audit({ actor: claims.sub, desktopId: c.desktopId, action: 'lease-renew', outcome: 'ok', detail: `device ${c.deviceId} until ${lease.deadline}` });
    return { lease: lease.lease };
  });
};
