import type { FastifyRequest, FastifyPluginAsync } from 'fastify';
import { z } from 'zod';
import type { BrokerContext } from '../../context.js';
import { HttpError, parse } from '../../http.js';
import { effectivePolicy, describePolicySource } from '../../policies.js';
import { powerDesktop } from '../../hosts/power.js';
import { userOf } from './user-scope.js';

/** Users: start and stop their desktop online where policy onlineAllowed lets them (user scope). */
export const desktopPowerRoutes: FastifyPluginAsync<{ ctx: BrokerContext }> = async (app, { ctx }) => {
  const userPower = (action: 'on' | 'shutdown' | 'reset') => async (req: FastifyRequest) => {
    const claims = userOf(req);
    const { id } = parse(z.object({ id: z.string().min(1).max(200) }), req.params);
    const desktop = await ctx.meta.getDesktop(id);
    const audit = `power-${action}`;
    if (!desktop || !(await ctx.meta.isEntitled(claims.sub, desktop))) {
      await ctx.audit({ actor: claims.sub, desktopId: desktop?.id ?? null, action: audit, outcome: 'denied', detail: `not-entitled: ${id}` });
      throw new HttpError(404, 'not-found', `no desktop ${id} you are entitled to`, {}, true);
    }
    const policy = await effectivePolicy(ctx.meta, claims.sub, desktop);
    if (!policy.onlineAllowed.value) {
      const message = `policy (${await describePolicySource(ctx.meta, policy.onlineAllowed.source)}) does not allow running ${desktop.name} online`;
      await ctx.audit({ actor: claims.sub, desktopId: desktop.id, action: audit, outcome: 'denied', detail: `policy-denied: ${message}` });
      throw new HttpError(403, 'policy-denied', message, {}, true);
    }
    return await powerDesktop(ctx, claims.sub, desktop, action);
  };
  app.post('/v1/desktops/:id/start', userPower('on'));
  app.post('/v1/desktops/:id/stop', userPower('shutdown'));
  // `carryon power DESKTOP reset` for a desktop running online (the host resets its guest).
  app.post('/v1/desktops/:id/reset', userPower('reset'));
};
