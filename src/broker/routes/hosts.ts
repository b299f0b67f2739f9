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
import { desktopsLost, failOver, hostAck, hostHeartbeat, hostsOverview, powerDesktop, prepareStart, releaseDesktop, sweepHosts } from '../hosts/power.js';
import { hostJobOwner } from '../hosts/health.js';
import { credentialMatches, makeCredential, parseCredential } from '../hosts/credentials.js';

declare module 'fastify' {
  interface FastifyContextConfig {
    /** The audit action a host route's refused credential is recorded under. */
    hostAction?: string;
  }
  interface FastifyRequest {
    /** The host whose own credential the request carried (set by `checkHostCredential`), and that credential's stored hash. */
    hostId?: string;
    hostKeyHash?: string;
  }
}

/**
 * A desktop host's request carries its own credential (credentials.ts); a refusal is audited under
 * `action`. A credential acts only for its host: a route naming another host id (`:id`) is
 * refused 403 `other-host`. Also the display relay's host routes (display.ts).
 */
export async function checkHostCredential(ctx: BrokerContext, req: FastifyRequest, action: string): Promise<void> {
  const raw = String(req.headers['x-carryon-host-secret'] ?? '');
  const given = parseCredential(raw);
  const stored = given ? await ctx.hosts.keyHash(given.hostId) : null;
  if (!given || !credentialMatches(stored, given.hostId, given.secret)) {
    // One answer for a wrong secret and an unknown or revoked host (no list of hosts to probe); the audit says which.
    const why = !raw ? 'no host credential' : !given ? "not a host's own credential (the shared host.secret is no longer accepted: `carryon admin hosts add ID` makes each host its own)" : 'the credential does not match a host the broker knows (wrong, never added, or revoked)';
    const detail = given && !stored ? `host ${given.hostId} has no credential (never added, or revoked)` : why;
    await ctx.audit({ actor: `anonymous@${req.ip}`, action, outcome: 'denied', detail: `bad-secret: ${detail}` });
    throw new HttpError(401, 'bad-secret', `host credential refused: ${why}`, {}, true);
  }
  const named = (req.params as { id?: unknown } | undefined)?.id;
  if (named !== undefined && named !== given.hostId) {
    await ctx.audit({ actor: `host:${given.hostId}`, action, outcome: 'denied', detail: `other-host: the credential is host ${given.hostId}'s, the request acts for host ${String(named)}` });
    throw new HttpError(403, 'other-host', `this credential is host ${given.hostId}'s: it cannot act for host ${String(named)}`, {}, true);
  }
  req.hostId = given.hostId;
  req.hostKeyHash = stored!;
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
 * Desktop hosts register, heartbeat and fetch what they need, each with its own credential (an
 * admin's `carryon admin hosts add ID`); they only ever call the broker, which never calls them.
 */
export const hostRoutes: FastifyPluginAsync<{ ctx: BrokerContext }> = async (app, { ctx }) => {
  markScope(app, 'machine');
  // Every route of this plugin is a host's: its credential, and that it acts for itself, are checked
  // (and a refusal audited under the route's action) before the body is read, whatever a handler does.
  app.addHook('onRequest', async (req) => checkHostCredential(ctx, req, req.routeOptions.config.hostAction ?? 'host-request'));
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
    if (b.id !== req.hostId) {
      await ctx.audit({ actor: `host:${req.hostId!}`, action: 'host-register', outcome: 'denied', detail: `other-host: registering as host ${b.id}` });
      throw new HttpError(403, 'other-host', `this credential is host ${req.hostId!}'s: it cannot register as host ${b.id}`, {}, true);
    }
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
  // Each host's own credential, shown once; the broker keeps its hash. Revoking cuts the host off at once.
  app.post('/v1/admin/hosts', async (req, reply) => {
    const actor = adminOf(req);
    const { id } = parse(z.object({ id: HostId }).strict(), req.body);
    const { credential, hash } = makeCredential(id);
    if (!(await ctx.hosts.addKey(id, hash, actor))) {
      await ctx.audit({ actor, action: 'host-add', outcome: 'denied', detail: `host-exists: host ${id} has a credential already` });
      throw new HttpError(409, 'host-exists', `host ${id} has a credential already: revoke it first (\`carryon admin hosts revoke ${id}\`) to make a new one`, {}, true);
    }
    await ctx.audit({ actor, action: 'host-add', outcome: 'ok', detail: `credential made for host ${id} (only its hash is kept)` });
    return reply.status(201).send({ id, credential });
  });
  app.delete('/v1/admin/hosts/:id', async (req) => {
    const actor = adminOf(req);
    const { id } = parse(Params, req.params);
    if (!(await ctx.hosts.revokeKey(id))) throw new HttpError(404, 'not-found', `host ${id} has no credential`);
    // Its next request is refused; a long poll in flight is woken and refused, its open displays closed, and what it ran is marked lost.
    const h = await ctx.hosts.markCutOff(id);
    displayRelay(ctx).cutOff(id);
    if (h) await desktopsLost(ctx, h, 'had its credential revoked');
    await ctx.audit({ actor, action: 'host-revoke', outcome: 'ok', detail: `host ${id}: credential revoked${h ? '; marked lost' : ''}` });
    return { revoked: id };
  });
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
