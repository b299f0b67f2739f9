import type { FastifyInstance, FastifyPluginAsync, FastifyRequest } from 'fastify';
import type { BrokerContext } from '../../context.js';
import { HttpError, requireDevice } from '../../http.js';
import type { DeviceRow } from '../../db/metadata.js';
import { markScope } from '../scopes.js';

declare module 'fastify' {
  interface FastifyContextConfig {
    /** An agent route a revoked device still reaches (its heartbeat and command acks: how its `lock` gets to it). */
    revokedDeviceAllowed?: boolean;
  }
  interface FastifyRequest {
    /** The device whose signature the agent scope's hook verified (only on routes inside that scope). */
    agentDevice?: DeviceRow & { revoked: boolean };
  }
}

/**
 * The agent scope, an encapsulated plugin: its hook verifies the device's signature (enrolled,
 * fresh, not replayed, not revoked unless the route's config says `revokedDeviceAllowed`) for
 * every request before any handler runs. A `preHandler` hook, not `onRequest`: the signature
 * covers the exact body bytes, which exist only once the body is read (installHttpBasics keeps
 * them as `rawBody`). The parsed body is not used before the check.
 */
export const agentScope: FastifyPluginAsync<{ ctx: BrokerContext; resources: (scoped: FastifyInstance) => Promise<void> }> = async (scoped, { ctx, resources }) => {
  markScope(scoped, 'agent');
  scoped.addHook('preHandler', async (req) => {
    req.agentDevice = await requireDevice(ctx, req, { allowRevoked: req.routeOptions.config.revokedDeviceAllowed === true });
  });
  await resources(scoped);
};

/** The device on a route inside the agent scope (its hook verified the signature). */
export function deviceOf(req: FastifyRequest): DeviceRow & { revoked: boolean } {
  if (!req.agentDevice) throw new HttpError(500, 'internal', `${req.method} ${req.routeOptions.url} asks for the device outside the agent scope`);
  return req.agentDevice;
}
