import type { FastifyInstance, FastifyPluginAsync, FastifyRequest } from 'fastify';
import type { BrokerContext } from '../../context.js';
import { HttpError, requireAdmin } from '../../http.js';
import type { SessionClaims } from '../../auth/tokens.js';
import { markScope, scopeOf } from '../scopes.js';

declare module 'fastify' {
  interface FastifyRequest {
    /** The admin session the admin scope's hook checked (only on routes inside that scope). */
    adminSession?: SessionClaims;
  }
}

export const ADMIN_PREFIX = '/v1/admin';
const inAdminScope = (app: FastifyInstance): boolean => scopeOf(app) === 'admin';

/**
 * The admin scope, an encapsulated plugin: its `onRequest` hook makes the admin check (401 without
 * a valid session, 403 `forbidden` for a non-admin, audited) for every request, before the body is
 * read or any handler runs, so a handler cannot forget it. `resources` registers the admin
 * resources' plugins inside it (they inherit the hook). Only `/v1/admin` routes belong here, and
 * every `/v1/admin` route must be here (`guardAdminRoutes`).
 */
export const adminScope: FastifyPluginAsync<{ ctx: BrokerContext; resources: (scoped: FastifyInstance) => Promise<void> }> = async (scoped, { ctx, resources }) => {
  markScope(scoped, 'admin');
  scoped.addHook('onRoute', (route) => {
    if (!route.url.startsWith(`${ADMIN_PREFIX}/`)) throw new Error(`route ${route.url} is in the admin scope but not under ${ADMIN_PREFIX}/`);
  });
  scoped.addHook('onRequest', async (req) => {
    req.adminSession = await requireAdmin(ctx, req);
  });
  await resources(scoped);
};

/**
 * Refuses, when the broker starts, a `/v1/admin` route registered outside the admin scope (where
 * nothing would check its caller). Add before any route.
 */
export function guardAdminRoutes(app: FastifyInstance): void {
  app.addHook('onRoute', function (this: FastifyInstance, route) {
    if (route.url.startsWith(ADMIN_PREFIX) && !inAdminScope(this)) throw new Error(`admin route ${route.method} ${route.url} is registered outside the admin scope`);
  });
}

/** The admin's name on a route inside the admin scope (its hook checked the session). */
export function adminOf(req: FastifyRequest): string {
  if (!req.adminSession) throw new HttpError(500, 'internal', `${req.method} ${req.routeOptions.url} asks for the admin outside the admin scope`);
  return req.adminSession.sub;
}
