import { timingSafeEqual } from 'node:crypto';
import type { FastifyPluginAsync } from 'fastify';
import { z } from 'zod';
import { publicKeyToBase64 } from '../../core/signing.js';
import type { BrokerContext } from '../context.js';
import { HttpError, parse } from '../http.js';
import { transfersOverview } from '../transfers/overview.js';
import { transferServerSync } from '../auth/trust.js';
import { gatewayStatus, makeGatewayConfig } from '../gateway/state.js';
import { adminOf } from './admin/admin-scope.js';
import { markScope } from './scopes.js';

const Count = z.number().int().min(0);
const JobStats = z.object({ id: z.string().min(1).max(100), bytesIn: Count, bytesOut: Count, chunksIn: Count, chunksOut: Count }).strict();
const Summary = z.object({
  jobId: z.string().max(200), checkoutId: z.string().max(200), desktopId: z.string().max(200), direction: z.enum(['download', 'upload']),
  bytesIn: z.number().min(0), bytesOut: z.number().min(0), chunksIn: z.number().int().min(0), chunksOut: z.number().int().min(0),
  firstAt: z.string().max(40), lastAt: z.string().max(40), reason: z.enum(['expired', 'ended']),
}).strict();

/** Transfer servers register and heartbeat with a shared secret. */
export const transferRoutes: FastifyPluginAsync<{ ctx: BrokerContext }> = async (app, { ctx }) => {
  markScope(app, 'machine');
  const checkSecret = (given: unknown) => {
    const a = Buffer.from(String(given ?? ''));
    const b = Buffer.from(ctx.settings.transferSecret);
    if (a.length !== b.length || !timingSafeEqual(a, b)) throw new HttpError(401, 'bad-secret', 'transfer-server secret does not match');
  };
  // Every route of this plugin is a transfer server's: the secret is checked before the body is read, whatever a handler does.
  app.addHook('onRequest', async (req) => checkSecret(req.headers['x-carryon-transfer-secret']));
  app.post('/v1/transfer-servers/register', async (req) => {
    const body = parse(z.object({ id: z.string().min(1).max(100), url: z.url(), slots: z.number().int().min(1).max(1024), fingerprint: z.string().regex(/^[0-9a-f]{64}$/) }).strict(), req.body);
    await ctx.scheduler.registerServer(body);
    await ctx.audit({ actor: `transfer:${body.id}`, action: 'transfer-server-register', outcome: 'ok', detail: `${body.url} slots=${body.slots}` });
    return { signingPublicKey: publicKeyToBase64(ctx.secrets.signing.publicKey) };
  });
  app.post('/v1/transfer-servers/:id/heartbeat', async (req) => {
    const { id } = parse(z.object({ id: z.string().max(100) }), req.params);
    const body = parse(z.object({ activeStreams: z.number().int().min(0), bytesIn: z.number().min(0), bytesOut: z.number().min(0), jobs: z.array(JobStats).max(10_000).optional(), evicted: z.array(Summary).max(10_000).optional() }).strict(), req.body);
    if (!await ctx.scheduler.serverHeartbeat(id, body)) throw new HttpError(404, 'not-registered', 'register first');
    if (body.jobs) ctx.jobProgress.report(id, body.jobs.map(({ id: jobId, ...c }) => [jobId, c]));
    // Per-job chunk access of evicted jobs goes to the audit trail; the answer is the current revocation list.
    return { ok: true, revokedJobs: await transferServerSync(ctx, id, body.evicted ?? []) };
  });
};

const Path = z.string().min(1).max(400).regex(/^[^\s#]+$/, 'no spaces or #');

/** Admins see the pool, and make the gateway's config for it (registered in the admin scope). */
export const transferAdminRoutes: FastifyPluginAsync<{ ctx: BrokerContext }> = async (app, { ctx }) => {
  app.get('/v1/admin/transfers', async () => ({ ...(await transfersOverview(ctx)), gateway: await gatewayStatus(ctx) }));
  app.get('/v1/admin/gateway', async () => ({ gateway: await gatewayStatus(ctx) }));
  app.post('/v1/admin/gateway/config', async (req) => {
    const body = parse(z.object({ bind: Path.optional(), statsSocket: Path.optional() }).strict(), req.body ?? {});
    const made = await makeGatewayConfig(ctx, body);
    await ctx.audit({ actor: adminOf(req), action: 'gateway-config', outcome: 'ok', detail: `server set ${made.status.serverSetHash.slice(0, 16)}… (${made.status.routes.length} backends)` });
    return made;
  });
};
