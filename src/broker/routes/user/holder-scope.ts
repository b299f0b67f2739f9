import type { FastifyInstance, FastifyPluginAsync, FastifyRequest } from 'fastify';
import { ownedCheckout } from '../../checkouts.js';
import type { CheckoutRow } from '../../db/metadata.js';
import type { BrokerContext } from '../../context.js';
import { HttpError, parse } from '../../http.js';
import { Id } from './host-facts.js';
import { userOf } from './user-scope.js';

declare module 'fastify' {
  interface FastifyRequest {
    /** The check-out named in the path, checked held by the session's user (holder scope only). */
    heldCheckout?: CheckoutRow;
  }
}

const PREFIX = '/v1/checkouts/:id';
// The audit's name for a refused call, as the operation itself names it (checkouts.ts, handback.ts).
const ACTIONS: Record<string, string> = { '': 'checkout-outcome', transferred: 'transfer-end', lease: 'lease-renew' };

/** `/v1/checkouts/:id/checkin/commit` → `checkin-commit`. */
export function holderAction(url: string): string {
  const rest = url.slice(PREFIX.length).replace(/^\//, '');
  return ACTIONS[rest] ?? rest.replaceAll('/', '-');
}

/**
 * The holder scope, inside the user scope: every route in it names one check-out
 * (`/v1/checkouts/:id…`), and its onRequest hook refuses the call unless the session's user
 * holds that check-out (404 unknown, 403 `not-holder`, audited), before the body is read or a
 * handler runs. A route added here cannot forget the check; a route that names no check-out
 * cannot be added here.
 */
export const holderScope: FastifyPluginAsync<{ ctx: BrokerContext; resources: (scoped: FastifyInstance) => Promise<void> }> = async (scoped, { ctx, resources }) => {
  scoped.addHook('onRoute', (r) => {
    if (r.url !== PREFIX && !r.url.startsWith(`${PREFIX}/`)) throw new Error(`${r.url} is in the holder scope but names no check-out (${PREFIX}…)`);
  });
  scoped.addHook('onRequest', async (req) => {
    req.heldCheckout = await ownedCheckout(ctx, userOf(req).sub, parse(Id, req.params).id, holderAction(req.routeOptions.url ?? PREFIX));
  });
  await resources(scoped);
};

/** The check-out the holder scope's hook checked for this request. */
export function heldCheckout(req: FastifyRequest): CheckoutRow {
  if (!req.heldCheckout) throw new HttpError(500, 'internal', `${req.method} ${req.routeOptions.url} asks for the held check-out outside the holder scope`);
  return req.heldCheckout;
}
