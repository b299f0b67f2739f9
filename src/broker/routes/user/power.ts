import type { FastifyRequest, FastifyPluginAsync } from 'fastify';
import type { BrokerContext } from '../../context.js';
import { HttpError } from '../../http.js';
import { effectivePolicy, describePolicySource } from '../../policies.js';
import { powerDesktop } from '../../hosts/power.js';
import { userOf } from './user-scope.js';
import { entitledDesktop } from './desktop-scope.js';

/** Users: start and stop their desktop online where policy onlineAllowed lets them (desktop scope: they are entitled to it). */
export const desktopPowerRoutes: FastifyPluginAsync<{ ctx: BrokerContext }> = async (app, { ctx }) => {
  const userPower = (action: 'on' | 'shutdown' | 'reset') => async (req: FastifyRequest) => {
    const claims = userOf(req);
    const desktop = entitledDesktop(req);
    const audit = `power-${action}`;
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
