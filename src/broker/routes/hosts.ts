import { timingSafeEqual } from 'node:crypto';
import type { FastifyRequest, FastifyPluginAsync } from 'fastify';
import { z } from 'zod';
import type { BrokerContext } from '../context.js';
import { HttpError, parse } from '../http.js';
import { adminOf } from './admin/admin-scope.js';
import { displayRelay } from '../display/relay.js';
import { beginHandover, commitHandover, handoverShutDown } from '../hosts/handover.js';
import { abandonReplica, beginReplica, commitReplica } from '../hosts/replica.js';
import { Changes, withReceipts } from './change-list.js';
import { markScope } from './scopes.js';
import { failOver, hostAck, hostHeartbeat, hostsOverview, powerDesktop, prepareStart, releaseDesktop, sweepHosts } from '../hosts/power.js';
import { hostJobOwner } from '../hosts/health.js';

declare module 'fastify' {
  interface FastifyContextConfig {
    /** The audit action a host route's refused secret is recorded under. */
    hostAction?: string;
  }
}

/** A desktop host's request carries the broker's host secret; a refusal is audited under `action`. Also the display relay's host routes (display.ts). */
export async function checkHostSecret(ctx: BrokerContext, req: FastifyRequest, action: string): Promise<void> {
  const a = Buffer.from(String(req.headers['x-carryon-host-secret'] ?? ''));
  const b = Buffer.from(ctx.settings.hostSecret);
  if (a.length !== b.length || !timingSafeEqual(a, b)) {
    await ctx.audit({ actor: `anonymous@${req.ip}`, action, outcome: 'denied', detail: 'bad-secret: the host secret does not match' });
    throw new HttpError(401, 'bad-secret', 'host secret does not match', {}, true);
  }
}

const HostId = z.string().regex(/^[A-Za-z0-9._-]{1,64}$/, 'a host id is 1–64 letters, digits, dots, dashes or underscores');
const Params = z.object({ id: HostId });
const Desktop = z.object({ desktopId: z.string().min(1).max(200), state: z.enum(['starting', 'running', 'stopping', 'stopped']), pid: z.number().int().min(1).optional(), detail: z.string().max(500).optional() }).strict();
const Report = z.object({
  desktops: z.array(Desktop).max(1024).default([]),
  /** Desktops whose base this host keeps (placement prefers it: fewer chunks to pull). */
  bases: z.array(z.string().min(1).max(200)).max(10_000).default([]),
  freeDiskBytes: z.number().int().min(0).optional(),
}).strict();

/**
 * Desktop hosts register, heartbeat and fetch what they need with the broker's `host.secret` (as
 * transfer servers do with theirs); they only ever call the broker, which never calls them.
 */
export const hostRoutes: FastifyPluginAsync<{ ctx: BrokerContext }> = async (app, { ctx }) => {
  markScope(app, 'machine');
  // Every route of this plugin is a host's: the secret is checked (and a refusal audited under the
  // route's action) before the body is read, whatever a handler does.
  app.addHook('onRequest', async (req) => checkHostSecret(ctx, req, req.routeOptions.config.hostAction ?? 'host-request'));
  const registered = async (req: FastifyRequest) => {
    const { id } = parse(Params, req.params);
    const host = await ctx.hosts.host(id);
    if (!host) throw new HttpError(404, 'not-registered', `host ${id} is not registered: register first`);
    return host;
  };

  app.post('/v1/hosts/register', { config: { hostAction: 'host-register' } }, async (req) => {
    const b = parse(z.object({
      id: HostId, displayUrl: z.string().max(300).nullable().default(null), vcpus: z.number().int().min(1).max(4096), ramMiB: z.number().int().min(64).max(1 << 30),
      maxDesktops: z.number().int().min(1).max(10_000), accel: z.enum(['kvm', 'tcg']), heartbeatSec: z.number().int().min(1).max(300),
    }).strict(), req.body);
    await ctx.hosts.register(b);
    await ctx.audit({ actor: `host:${b.id}`, action: 'host-register', outcome: 'ok', detail: `${b.vcpus} vCPUs, ${b.ramMiB} MiB, up to ${b.maxDesktops} desktops, ${b.accel}` });
    return { ok: true };
  });
  app.post('/v1/hosts/:id/heartbeat', { config: { hostAction: 'host-heartbeat' } }, async (req) => {
    const host = await registered(req);
    const report = parse(Report, req.body);
    await ctx.hosts.heartbeat(host.id, report);
    await sweepHosts(ctx);
    const commands = await hostHeartbeat(ctx, host, report);
    return { commands: await displayRelay(ctx).commandsFor(host.id, commands) };
  });
  app.post('/v1/hosts/:id/retire', { config: { hostAction: 'host-retire' } }, async (req) => {
    const host = await registered(req);
    parse(z.object({}).strict(), req.body ?? {});
    // Whatever it still ran is reported by its last heartbeat (it powers its guests off first); what is still placed stays as it is.
    await ctx.hosts.retire(host.id);
    await ctx.audit({ actor: `host:${host.id}`, action: 'host-retire', outcome: 'ok', detail: 'stopped cleanly' });
    return { ok: true };
  });
  app.post('/v1/hosts/:id/desktops/:desktopId/prepare', { config: { hostAction: 'host-prepare' } }, async (req) => {
    const host = await registered(req);
    const { desktopId } = parse(z.object({ id: HostId, desktopId: z.string().min(1).max(200) }), req.params);
    return await prepareStart(ctx, host.id, desktopId);
  });
  // A check-out of a desktop this host runs (hosts/handover.ts): begin (an upload job), the guest is off, commit.
  const HandoverParams = z.object({ id: HostId, desktopId: z.string().min(1).max(200) });
  app.post('/v1/hosts/:id/desktops/:desktopId/handover', { config: { hostAction: 'handover' } }, async (req) => {
    const host = await registered(req);
    parse(z.object({}).strict(), req.body ?? {});
    return await beginHandover(ctx, host.id, parse(HandoverParams, req.params).desktopId);
  });
  app.post('/v1/hosts/:id/desktops/:desktopId/handover/shutdown', { config: { hostAction: 'handover' } }, async (req) => {
    const host = await registered(req);
    const b = parse(z.object({ forced: z.boolean(), message: z.string().max(2000) }).strict(), req.body);
    return await handoverShutDown(ctx, host.id, parse(HandoverParams, req.params).desktopId, b);
  });
  app.post('/v1/hosts/:id/desktops/:desktopId/handover/commit', { config: { hostAction: 'handover-commit' } }, async (req) => {
    const host = await registered(req);
    const { changes, receipts } = withReceipts(parse(Changes, req.body ?? {}).disks);
    return await commitHandover(ctx, host.id, parse(HandoverParams, req.params).desktopId, changes, receipts);
  });
  // A background replica of a desktop this host runs (hosts/replica.ts): begin (an upload job), commit or abandon.
  app.post('/v1/hosts/:id/desktops/:desktopId/replica', { config: { hostAction: 'host-replica' } }, async (req) => {
    const host = await registered(req);
    parse(z.object({}).strict(), req.body ?? {});
    return await beginReplica(ctx, host.id, parse(HandoverParams, req.params).desktopId);
  });
  const ReplicaJob = z.object({ jobId: z.string().min(1).max(200) });
  app.post('/v1/hosts/:id/desktops/:desktopId/replica/commit', { config: { hostAction: 'host-replica-commit' } }, async (req) => {
    const host = await registered(req);
    const b = parse(Changes.extend(ReplicaJob.shape), req.body ?? {});
    const { changes, receipts } = withReceipts(b.disks);
    return await commitReplica(ctx, host.id, parse(HandoverParams, req.params).desktopId, b.jobId, changes, receipts);
  });
  app.post('/v1/hosts/:id/desktops/:desktopId/replica/abandon', { config: { hostAction: 'host-replica' } }, async (req) => {
    const host = await registered(req);
    const b = parse(ReplicaJob.extend({ message: z.string().max(2000) }).strict(), req.body);
    return await abandonReplica(ctx, host.id, parse(HandoverParams, req.params).desktopId, b.jobId, b.message);
  });
  app.get('/v1/hosts/:id/jobs/:jobId', { config: { hostAction: 'host-job' } }, async (req) => {
    const host = await registered(req);
    const { jobId } = parse(z.object({ id: HostId, jobId: z.string().min(1).max(200) }), req.params);
    // Only the jobs made for this host's starts (their owner names it).
    const owner = await ctx.scheduler.checkoutOf(jobId);
    if (!owner?.startsWith(hostJobOwner(host.id, ''))) throw new HttpError(404, 'not-found', 'no such job of this host');
    // Hosts are in the datacenter: the transfer server's own address, never the gateway.
    return (await ctx.scheduler.get(jobId, 'internal'))!;
  });
  app.post('/v1/hosts/:id/commands/:commandId', { config: { hostAction: 'host-ack' } }, async (req) => {
    const host = await registered(req);
    const { commandId } = parse(z.object({ id: HostId, commandId: z.string().min(1).max(200) }), req.params);
    const b = parse(z.object({ ok: z.boolean(), message: z.string().max(2000).nullable().default(null), kept: z.boolean().optional(), guest: z.enum(['running', 'stopped']).optional() }).strict(), req.body);
    await hostAck(ctx, host.id, commandId, b);
    if (!b.ok && displayRelay(ctx).has(commandId)) await displayRelay(ctx).hostFailed(commandId, b.message);
    return { ok: true };
  });
};

/** Admins: the hosts, power of any desktop, and the decision to discard a host's online changes (admin scope). */
export const hostAdminRoutes: FastifyPluginAsync<{ ctx: BrokerContext }> = async (app, { ctx }) => {
  app.get('/v1/admin/hosts', async () => await hostsOverview(ctx));
  app.post('/v1/admin/desktops/:id/power', async (req) => {
    const actor = adminOf(req);
    const d = await ctx.meta.getDesktop(parse(z.object({ id: z.string().min(1).max(200) }), req.params).id);
    if (!d) throw new HttpError(404, 'not-found', 'no such desktop');
    const b = parse(z.object({ action: z.enum(['on', 'off', 'reset', 'shutdown']) }).strict(), req.body);
    return await powerDesktop(ctx, actor, d, b.action);
  });
  app.post('/v1/admin/desktops/:id/release', async (req) => {
    const actor = adminOf(req);
    const d = await ctx.meta.getDesktop(parse(z.object({ id: z.string().min(1).max(200) }), req.params).id);
    if (!d) throw new HttpError(404, 'not-found', 'no such desktop');
    const b = parse(z.object({ reason: z.string().max(500).optional(), host: HostId.optional() }).strict(), req.body ?? {});
    return await releaseDesktop(ctx, actor, d, b.reason, b.host);
  });
  app.post('/v1/admin/desktops/:id/failover', async (req) => {
    const actor = adminOf(req);
    const d = await ctx.meta.getDesktop(parse(z.object({ id: z.string().min(1).max(200) }), req.params).id);
    if (!d) throw new HttpError(404, 'not-found', 'no such desktop');
    const b = parse(z.object({ reason: z.string().max(500).optional() }).strict(), req.body ?? {});
    return await failOver(ctx, actor, d, b.reason);
  });
};
