import type { FastifyPluginAsync } from 'fastify';
import { z } from 'zod';
import { publicKeyFromBase64 } from '../../../core/signing.js';
import type { BrokerContext } from '../../context.js';
import { HttpError, parse } from '../../http.js';
import { brokerRoute } from '../../gateway/state.js';
import { Host } from './host-facts.js';
import { userOf } from './user-scope.js';

/** Enrolment: a logged-in user's laptop registers its device key (user scope). */
export const deviceRoutes: FastifyPluginAsync<{ ctx: BrokerContext }> = async (app, { ctx }) => {
  app.post('/v1/devices', async (req, reply) => {
    const claims = userOf(req);
    const body = parse(z.object({ name: z.string().min(1).max(128), publicKey: z.string().min(1).max(1024), host: Host }).strict(), req.body);
    try {
      publicKeyFromBase64(body.publicKey);
    } catch (err) {
      throw new HttpError(400, 'bad-public-key', (err as Error).message);
    }
    const deviceId = await ctx.meta.createDevice({ user: claims.sub, name: body.name, publicKey: body.publicKey, host: body.host });
    await ctx.audit({ actor: claims.sub, action: 'enroll', outcome: 'ok', detail: `device ${deviceId} (${body.name})` });
    // With a gateway: the broker's route through it (a laptop enrolled inside keeps it for outside).
    const gateway = brokerRoute(ctx);
    return reply.status(201).send({ deviceId, ...(gateway ? { gateway } : {}) });
  });
};
