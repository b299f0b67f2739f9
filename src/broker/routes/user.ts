import type { FastifyPluginAsync } from 'fastify';
import { z } from 'zod';
import { PACKAGE_VERSION } from '../version.js';
import { isChunkId } from '../../core/chunk-id.js';
import { RECEIPT_RE } from '../../core/tokens/push-receipt.js';
import { publicKeyFromBase64, publicKeyToBase64 } from '../../core/signing.js';
import { allowedActions, beginUpload, cancel, checkOut, checkoutView, commitUpload, issueLease, markTransferred, rollback, type DiskChanges } from '../checkouts.js';
import type { BrokerContext } from '../context.js';
import { beginHandback, checkoutOutcome, commitHandback } from '../handback.js';
import { reportChunkFailure } from '../desktops/damage.js';
import type { DesktopRow } from '../db/metadata.js';
import { accountName, authenticate, DirectoryUnavailableError } from '../auth/directory.js';
import { HttpError, parse, requireUser } from '../http.js';
import { effectivePolicy } from '../policies.js';
import { issueToken } from '../auth/tokens.js';
import { requireFreshLogin } from '../auth/trust.js';
import { brokerRoute } from '../gateway/state.js';

const Host = z.object({
  os: z.string().max(200).optional(),
  cpus: z.number().int().min(1).max(4096),
  ramBytes: z.number().int().min(0),
  freeDiskBytes: z.number().int().min(0),
});
const Id = z.object({ id: z.string().min(1).max(200) });
const DiskName = z.string().min(1).max(64);
/** Begin: nothing (the transfer server names the chunks; the commit carries the changes). */
const Begin = z.object({}).strict();
/**
 * Commit: per disk, chunk index → new ID (null: a hole) and, for a new chunk, the push receipt its
 * transfer server gave: `[index, id, receipt?]` (inline, so the ID is not sent twice).
 */
const Change = z.tuple([z.number().int().min(0).max(2 ** 31), z.string().refine(isChunkId, 'not a chunk ID').nullable()], z.string().regex(RECEIPT_RE, 'not a push receipt'))
  .refine((c) => c.length <= 3, 'a change is [index, id, receipt?]');
const Changes = z.object({
  disks: z.array(z.object({ name: DiskName, changes: z.array(Change).max(1 << 20) }).strict()).max(16).optional(),
}).strict();

/** The commit's changes as the broker applies them, and the receipts they carried, by chunk ID. */
function withReceipts(disks: z.infer<typeof Changes>['disks'] = []): { changes: DiskChanges[]; receipts: Record<string, string> } {
  const receipts: Record<string, string> = {};
  const changes = disks.map((d) => ({
    name: d.name,
    changes: d.changes.map(([index, id, receipt]): [number, string | null] => {
      if (id && receipt) receipts[id] = receipt;
      return [index, id];
    }),
  }));
  return { changes, receipts };
}

/** Routes for users and their laptops: login, enrolment, desktops, check-out life cycle. */
export const userRoutes: FastifyPluginAsync<{ ctx: BrokerContext }> = async (app, { ctx }) => {
  app.get('/v1/broker', async () => ({ version: PACKAGE_VERSION, signingPublicKey: publicKeyToBase64(ctx.secrets.signing.publicKey) }));

  app.post('/v1/auth/login', async (req, reply) => {
    const body = parse(z.object({ username: z.string().min(1).max(64), password: z.string().min(1).max(1024), deviceId: z.string().max(200).optional() }).strict(), req.body);
    // Failed-login backoff per account (not per spelling) and per source address (src/broker/auth/throttle.ts).
    const name = accountName(ctx.settings.ldap, body.username);
    // The attempt is counted before the password is judged: parallel guesses wait their turn.
    const reserved = await ctx.throttle.reserve(name, req.ip);
    if (!reserved.ok) {
      const sec = Math.ceil(reserved.retryAfterMs / 1000);
      await ctx.audit({ actor: name, action: 'login', outcome: 'denied', detail: `throttled: too many failed logins for this user or from ${req.ip}; retry in ${sec} s` });
      void reply.header('retry-after', String(sec));
      throw new HttpError(429, 'too-many-attempts', `too many failed logins: try again in ${sec} s`, { retryAfterSec: sec }, true);
    }
    let who;
    try {
      who = await authenticate(ctx.meta, ctx.settings.ldap, body.username, body.password);
    } catch (err) {
      await ctx.throttle.release(name, req.ip);
      if (!(err instanceof DirectoryUnavailableError)) throw err;
      await ctx.audit({ actor: name, action: 'login', outcome: 'failed', detail: err.message });
      throw new HttpError(503, err.code, err.message, {}, true);
    }
    if (!who) {
      await ctx.audit({ actor: name, action: 'login', outcome: 'denied', detail: `bad credentials from ${req.ip}` });
      throw new HttpError(401, 'bad-credentials', 'unknown user or wrong password', {}, true);
    }
    await ctx.throttle.succeed(name, req.ip);
    if (body.deviceId && (await ctx.meta.deviceRevokedAt(body.deviceId))) {
      await ctx.audit({ actor: who.name, action: 'login', outcome: 'denied', detail: `device ${body.deviceId} is revoked` });
      throw new HttpError(403, 'device-revoked', 'this device has been revoked by an administrator', {}, true);
    }
    const iat = Math.floor(Date.now() / 1000);
    const exp = iat + ctx.settings.sessionTtlSec;
    const token = issueToken(ctx.secrets.tokenKey, { sub: who.name, role: who.role, exp, iat, dev: body.deviceId });
    let lease;
    if (body.deviceId) {
      const device = await ctx.meta.getDevice(body.deviceId);
      if (device && device.user === who.name) lease = (await issueLease(ctx, who.name, device.id))?.lease;
      if (lease) await ctx.audit({ actor: who.name, action: 'lease-renew', outcome: 'ok', detail: `at login on device ${body.deviceId}` });
    }
    await ctx.audit({ actor: who.name, action: 'login', outcome: 'ok', detail: body.deviceId ? `device ${body.deviceId}` : undefined });
    return { token, expiresAt: new Date(exp * 1000).toISOString(), user: who, lease };
  });

  app.post('/v1/devices', async (req, reply) => {
    const claims = await requireUser(ctx, req);
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

  app.get('/v1/desktops', async (req) => {
    const claims = await requireUser(ctx, req);
    const desktops: DesktopRow[] = [];
    for (const d of await ctx.meta.listDesktops()) if (await ctx.meta.isEntitled(claims.sub, d)) desktops.push(d);
    return {
      desktops: await Promise.all(desktops.map(async (d) => {
        const active = await ctx.meta.activeCheckout(d.id);
        return {
          id: d.id,
          name: d.name,
          pool: d.poolId,
          state: active ? active.state : 'available',
          // Someone else's checkout shows who and what state, never its job or device.
          checkout: active ? (active.user === claims.sub ? checkoutView(active) : { ...checkoutView(active), jobId: undefined, deviceId: undefined }) : undefined,
          actions: await allowedActions(ctx, claims.sub, d),
          policy: await effectivePolicy(ctx.meta, claims.sub, d),
        };
      })),
    };
  });

  app.post('/v1/desktops/:id/checkout', async (req, reply) => {
    const claims = await requireUser(ctx, req);
    const { id } = parse(Id, req.params);
    const body = parse(z.object({ deviceId: z.string().min(1).max(200), host: Host }).strict(), req.body);
    return reply.status(201).send(await checkOut(ctx, claims.sub, id, body));
  });

  app.post('/v1/checkouts/:id/transferred', async (req) => ({ checkout: await markTransferred(ctx, (await requireUser(ctx, req)).sub, parse(Id, req.params).id) }));
  // A chunk the laptop could not authenticate (3 tries): checked against the store, audited, remembered when the store's copy is bad.
  app.post('/v1/checkouts/:id/damaged', async (req) => {
    const user = (await requireUser(ctx, req)).sub;
    const b = parse(z.object({ chunkId: z.string().max(100), detail: z.string().max(2000) }).strict(), req.body);
    return reportChunkFailure(ctx, user, parse(Id, req.params).id, b.chunkId, b.detail);
  });
  app.post('/v1/checkouts/:id/cancel', async (req) => ({ checkout: await cancel(ctx, (await requireUser(ctx, req)).sub, parse(Id, req.params).id) }));
  // Sensitive after an offline login: with requireOnlineReauth they need a recent password login.
  app.post('/v1/checkouts/:id/rollback', async (req) => {
    const claims = await requireUser(ctx, req);
    const { id } = parse(Id, req.params);
    await requireFreshLogin(ctx, claims, id, 'rollback');
    return { checkout: await rollback(ctx, claims.sub, id) };
  });
  for (const kind of ['checkin', 'replicate'] as const) {
    app.post(`/v1/checkouts/:id/${kind}`, async (req) => {
      const claims = await requireUser(ctx, req);
      const { id } = parse(Id, req.params);
      await requireFreshLogin(ctx, claims, id, kind);
      parse(Begin, req.body ?? {});
      return await beginUpload(ctx, claims.sub, id, kind);
    });
    app.post(`/v1/checkouts/:id/${kind}/commit`, async (req) => {
      const claims = await requireUser(ctx, req);
      const { changes, receipts } = withReceipts(parse(Changes, req.body ?? {}).disks);
      return await commitUpload(ctx, claims.sub, parse(Id, req.params).id, kind, changes, receipts);
    });
  }
  // A check-out that ended while the laptop held work: what it made, and handing the work back.
  app.get('/v1/checkouts/:id', async (req) => await checkoutOutcome(ctx, (await requireUser(ctx, req)).sub, parse(Id, req.params).id));
  app.post('/v1/checkouts/:id/handback', async (req) => {
    const claims = await requireUser(ctx, req);
    const { id } = parse(Id, req.params);
    await requireFreshLogin(ctx, claims, id, 'handback');
    parse(Begin, req.body ?? {});
    return await beginHandback(ctx, claims.sub, id);
  });
  app.post('/v1/checkouts/:id/handback/commit', async (req) => {
    const claims = await requireUser(ctx, req);
    const { changes, receipts } = withReceipts(parse(Changes, req.body ?? {}).disks);
    return await commitHandback(ctx, claims.sub, parse(Id, req.params).id, changes, receipts);
  });
  app.post('/v1/checkouts/:id/lease', async (req) => {
    const claims = await requireUser(ctx, req);
    const c = await ctx.meta.getCheckout(parse(Id, req.params).id);
    if (!c || c.user !== claims.sub) throw new HttpError(404, 'not-found', 'no such checkout of yours');
    const lease = await issueLease(ctx, claims.sub, c.deviceId);
    if (!lease) throw new HttpError(409, 'wrong-state', 'no active checkout to lease');
    await ctx.audit({ actor: claims.sub, desktopId: c.desktopId, action: 'lease-renew', outcome: 'ok', detail: `device ${c.deviceId} until ${lease.deadline}` });
    return { lease: lease.lease };
  });
};
