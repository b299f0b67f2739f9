import type { FastifyInstance, FastifyPluginAsync, FastifyRequest } from 'fastify';
import { z } from 'zod';
import type { DesktopRow } from '../../db/metadata.js';
import type { BrokerContext } from '../../context.js';
import { HttpError, parse } from '../../http.js';
import { userOf } from './user-scope.js';

declare module 'fastify' {
  interface FastifyRequest {
    /** The desktop named in the path, checked entitled to the session's user (desktop scope only). */
    entitledDesktop?: DesktopRow;
  }
  interface FastifyContextConfig {
    /** Desktop scope: administrators may call this route for any desktop (restore points). */
    adminsToo?: boolean;
  }
}

const PREFIX = '/v1/desktops/:id';
const Id = z.object({ id: z.string().min(1).max(200) });
// The audit's name for a refused call, as the operation itself names it.
const ACTIONS: Record<string, string> = { start: 'power-on', stop: 'power-shutdown', reset: 'power-reset', 'display-ticket': 'display-open' };

/** `/v1/desktops/:id/start` → `power-on`; other routes by their last step (`checkout`, `restore`). */
export function desktopAction(url: string): string {
  const rest = url.slice(PREFIX.length).replace(/^\//, '');
  return ACTIONS[rest] ?? rest.replaceAll('/', '-');
}

/**
 * The desktop scope, inside the user scope: every route in it names one desktop
 * (`/v1/desktops/:id/…`, by ID or name), and its onRequest hook refuses the call unless the
 * session's user is entitled to that desktop, before the body is read or a handler runs: 403
 * `not-entitled`, audited, the same answer for a desktop that does not exist (a name is not
 * confirmed to someone who may not use it). A route added here cannot forget the check.
 */
export const desktopScope: FastifyPluginAsync<{ ctx: BrokerContext; resources: (scoped: FastifyInstance) => Promise<void> }> = async (scoped, { ctx, resources }) => {
  scoped.addHook('onRoute', (r) => {
    if (!r.url.startsWith(`${PREFIX}/`)) throw new Error(`${r.url} is in the desktop scope but names no desktop (${PREFIX}/…)`);
  });
  scoped.addHook('onRequest', async (req) => {
    const claims = userOf(req);
    const { id } = parse(Id, req.params);
    const desktop = await ctx.meta.getDesktop(id);
    const admin = req.routeOptions.config.adminsToo === true && claims.role === 'admin';
    if (!desktop || !(admin || await ctx.meta.isEntitled(claims.sub, desktop))) {
      const message = `you are not entitled to a desktop named ${id}`;
      await ctx.audit({ actor: claims.sub, desktopId: desktop?.id ?? null, action: desktopAction(req.routeOptions.url ?? PREFIX), outcome: 'denied', detail: `not-entitled: ${message}` });
      throw new HttpError(403, 'not-entitled', message, {}, true);
    }
    req.entitledDesktop = desktop;
  });
  await resources(scoped);
};

/** The desktop the desktop scope's hook checked for this request. */
export function entitledDesktop(req: FastifyRequest): DesktopRow {
  if (!req.entitledDesktop) throw new HttpError(500, 'internal', `${req.method} ${req.routeOptions.url} asks for the entitled desktop outside the desktop scope`);
  return req.entitledDesktop;
}
