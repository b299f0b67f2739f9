import type { FastifyInstance, FastifyRequest } from 'fastify';
import type { BrokerContext } from '../../context.js';
import { HttpError, requireAdmin } from '../../http.js';
import type { SessionClaims } from '../../auth/tokens.js';

declare module 'fastify' {
  interface FastifyRequest {
    /** The admin session the admin scope's hook checked (only on routes inside that scope). */
    adminSession?: SessionClaims;
  }
}

export const ADMIN_PREFIX = '/v1/admin';
/** Set on the admin scope's instance; the plugins it registers inherit it (their prototype). */
const IN_ADMIN_SCOPE = Symbol('carryon admin scope');
const inAdminScope = (app: FastifyInstance): boolean => (app as unknown as Record<symbol, unknown>)[IN_ADMIN_SCOPE] === true;

/** A group of routes that registers itself on the instance it is given. */
export type Routes = (app: FastifyInstance) => void;

/**
 * Registers `groups` in one encapsulated plugin whose `onRequest` hook makes the admin check
 * (401 without a valid session, 403 `forbidden` for a non-admin, audited as before) for every
 * request, before its body is read or any handler runs: a handler cannot forget it. Only
 * `/v1/admin` routes belong here, and every `/v1/admin` route must be here (`guardAdminRoutes`).
 */
export function adminScope(app: FastifyInstance, ctx: BrokerContext, groups: Routes[]): void {
  void app.register(async (scoped) => {
    (scoped as unknown as Record<symbol, unknown>)[IN_ADMIN_SCOPE] = true;
    scoped.addHook('onRoute', (route) => {
      if (!route.url.startsWith(`${ADMIN_PREFIX}/`)) throw new Error(`route ${route.url} is in the admin scope but not under ${ADMIN_PREFIX}/`);
    });
    scoped.addHook('onRequest', async (req) => {
      req.adminSession = await requireAdmin(ctx, req);
    });
    for (const group of groups) group(scoped);
  });
}

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
