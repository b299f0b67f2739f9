import type { FastifyPluginAsync } from 'fastify';
import { z } from 'zod';
import { PACKAGE_VERSION } from '../version.js';
import { publicKeyToBase64 } from '../../core/signing.js';
import { issueLease, ownedCheckout } from '../checkouts.js';
import { releaseUnlockShare } from '../online-unlock.js';
import type { BrokerContext } from '../context.js';
import { accountName, authenticate, DirectoryUnavailableError } from '../auth/directory.js';
import { HttpError, parse } from '../http.js';
import { issueToken } from '../auth/tokens.js';
import { markScope } from './scopes.js';

/**
 * What a laptop reaches before it has a session, outside the user scope on purpose: the broker's
 * version and keys (public), and login (its proof is the password, throttled).
 */
export const openRoutes: FastifyPluginAsync<{ ctx: BrokerContext }> = async (app, { ctx }) => {
  markScope(app, 'open');
  // releasePublicKey: what laptops pin at enrolment to verify client updates (null: none configured).
  app.get('/v1/broker', async () => ({ version: PACKAGE_VERSION, signingPublicKey: publicKeyToBase64(ctx.secrets.signing.publicKey), releasePublicKey: ctx.releases.keyB64 }));

  app.post('/v1/auth/login', async (req, reply) => {
    // `unlock`: a check-out the laptop will open its vault for (online-unlock.ts): its share comes with the answer.
    const body = parse(z.object({ username: z.string().min(1).max(64), password: z.string().min(1).max(1024), deviceId: z.string().max(200).optional(), unlock: z.string().min(1).max(200).optional() }).strict(), req.body);
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
    const claims = { sub: who.name, role: who.role, exp, iat, dev: body.deviceId };
    const token = issueToken(ctx.secrets.tokenKey, claims);
    let lease;
    if (body.deviceId) {
      const device = await ctx.meta.getDevice(body.deviceId);
      if (device && device.user === who.name) lease = (await issueLease(ctx, who.name, device.id))?.lease;
      if (lease) await ctx.audit({ actor: who.name, action: 'lease-renew', outcome: 'ok', detail: `at login on device ${body.deviceId}` });
    }
    await ctx.audit({ actor: who.name, action: 'login', outcome: 'ok', detail: body.deviceId ? `device ${body.deviceId}` : undefined });
    // The same checks as `POST /v1/checkouts/:id/unlock` right after this login (held by this user, open,
    // on this device, the password just checked): one round trip less for every online command. A
    // refusal is audited there and answered with no share; the laptop then asks the usual way and is told why.
    let unlock;
    if (body.unlock && body.deviceId) {
      try {
        const c = await ownedCheckout(ctx, who.name, body.unlock, 'online-unlock');
        unlock = { checkoutId: c.id, ...(await releaseUnlockShare(ctx, claims, c)) };
      } catch (err) {
        if (!(err instanceof HttpError)) throw err;
      }
    }
    return { token, expiresAt: new Date(exp * 1000).toISOString(), user: who, lease, unlock };
  });
};
