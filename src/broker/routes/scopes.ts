import type { FastifyInstance } from 'fastify';

/**
 * Who may call a route, decided by the plugin it is registered in (issue 23): `admin` and `user`
 * (a session, checked by the scope's onRequest hook), `agent` (a device signature, checked by its
 * preHandler hook), `machine` (a transfer server's or a host's secret, checked by their plugins'
 * hooks), `open` (no session: login, the broker's keys, the display's one-time ticket; each such
 * route makes its own proof).
 */
export type RouteScope = 'admin' | 'user' | 'agent' | 'machine' | 'open';

/** Set on a scope's plugin instance; the plugins registered inside it inherit it (their prototype). */
const SCOPE = Symbol('carryon route scope');

export function markScope(app: FastifyInstance, scope: RouteScope): void {
  (app as unknown as Record<symbol, unknown>)[SCOPE] = scope;
}

export function scopeOf(app: FastifyInstance): RouteScope | undefined {
  return (app as unknown as Record<symbol, RouteScope | undefined>)[SCOPE];
}

/**
 * Refuses, when the broker starts, a `/v1` route registered in no scope: a new route must say who
 * may call it, so it cannot land where nothing checks its caller. Add before any route.
 */
export function guardScopedRoutes(app: FastifyInstance): void {
  app.addHook('onRoute', function (this: FastifyInstance, route) {
    if (route.url.startsWith('/v1/') && !scopeOf(this)) throw new Error(`route ${[route.method].flat().join(',')} ${route.url} is registered in no scope (admin, user, agent, machine or open)`);
  });
}
