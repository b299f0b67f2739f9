import type { FastifyInstance, FastifyPluginAsync, FastifyRequest } from 'fastify';
import type { BrokerContext } from '../../context.js';
import { HttpError, requireUser } from '../../http.js';
import type { SessionClaims } from '../../auth/tokens.js';
import { markScope } from '../scopes.js';

declare module 'fastify' {
  interface FastifyRequest {
    /** The user session the user scope's hook checked (only on routes inside that scope). */
    userSession?: SessionClaims;
  }
}

/**
 * The user scope, an encapsulated plugin: its `onRequest` hook checks the session (401 without a
 * valid one or for a disabled user, 403 `device-revoked` for a session of a revoked device) for
 * every request, before the body is read or any handler runs, so a handler cannot forget it.
 * `resources` registers the users' resources inside it (they inherit the hook). Routes reachable
 * without a session are registered outside, in the `open` scope.
 */
export const userScope: FastifyPluginAsync<{ ctx: BrokerContext; resources: (scoped: FastifyInstance) => Promise<void> }> = async (scoped, { ctx, resources }) => {
  markScope(scoped, 'user');
  scoped.addHook('onRequest', async (req) => {
    req.userSession = await requireUser(ctx, req);
  });
  await resources(scoped);
};

/** The session on a route inside the user scope (its hook checked it; `role` as the directory says now). */
export function userOf(req: FastifyRequest): SessionClaims {
  if (!req.userSession) throw new HttpError(500, 'internal', `${req.method} ${req.routeOptions.url} asks for the user outside the user scope`);
  return req.userSession;
}
