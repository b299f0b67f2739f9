import type { FastifyPluginAsync } from 'fastify';
import { z } from 'zod';
import { allowedActions, checkOut } from '../../checkouts.js';
import { checkoutView } from '../../upload-rules.js';
import type { BrokerContext } from '../../context.js';
import type { DesktopRow } from '../../db/metadata.js';
import { parse } from '../../http.js';
import { effectivePolicy } from '../../policies.js';
import { Host } from './host-facts.js';
import { parkedUnlockShare } from '../../online-unlock.js';
import { entitledDesktop } from './desktop-scope.js';
import { userOf } from './user-scope.js';

/** A user's desktops: those they are entitled to (user scope). */
export const desktopRoutes: FastifyPluginAsync<{ ctx: BrokerContext }> = async (app, { ctx }) => {
  app.get('/v1/desktops', async (req) => {
    const claims = userOf(req);
    const desktops: DesktopRow[] = [];
    for (const d of await ctx.meta.listDesktops()) if (await ctx.meta.isEntitled(claims.sub, d)) desktops.push(d);
    return {
      desktops: await Promise.all(desktops.map(async (d) => {
        const active = await ctx.meta.activeCheckout(d.id);
        return {
          id: d.id,
          name: d.name,
          pool: d.poolId,
          state: active ? active.state : 'available',
          // Someone else's checkout shows who and what state, never its job or device.
          checkout: active ? (active.user === claims.sub ? checkoutView(active) : { ...checkoutView(active), jobId: undefined, deviceId: undefined }) : undefined,
          actions: await allowedActions(ctx, claims.sub, d),
          policy: await effectivePolicy(ctx.meta, claims.sub, d),
        };
      })),
    };
  });
};

/** Checking a desktop out (desktop scope: the user is entitled to it). */
export const desktopCheckoutRoutes: FastifyPluginAsync<{ ctx: BrokerContext }> = async (app, { ctx }) => {
  app.post('/v1/desktops/:id/checkout', async (req, reply) => {
    const claims = userOf(req);
    // parkedFrom: the check-out this laptop's parked copy of the desktop came from (its keys' share comes back as parkUnlock).
    const body = parse(z.object({ deviceId: z.string().min(1).max(200), host: Host, parkedFrom: z.string().min(1).max(200).optional() }).strict(), req.body);
    const desktop = entitledDesktop(req);
    const answer = await checkOut(ctx, claims.sub, desktop, body);
    if (!('handover' in answer) && body.parkedFrom) {
      const parkUnlock = await parkedUnlockShare(ctx, claims.sub, { desktopId: desktop.id, deviceId: body.deviceId }, body.parkedFrom);
      if (parkUnlock) return reply.status(201).send({ ...answer, parkUnlock });
    }
    // 202: a desktop on a host is handed over first; the laptop polls the handover, then asks again.
    return reply.status('handover' in answer ? 202 : 201).send(answer);
  });
};
