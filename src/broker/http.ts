import type { FastifyInstance, FastifyRequest } from 'fastify';
import type { z } from 'zod';
import { acceptOnlyOurMediaTypes, drainRefusedBody } from '../net/body-limits.js';
import { mapError, zodMessage } from '../net/http-errors.js';
import { checkDeviceSignature, DEVICE_HEADER, MAX_SKEW_MS, NONCE_HEADER, SIGNATURE_HEADER, TIME_HEADER } from '../core/tokens/device-auth.js';
import { publicKeyFromBase64 } from '../core/signing.js';
import type { DeviceRow } from './db/metadata.js';
import type { BrokerContext } from './context.js';
import { readToken, type SessionClaims } from './auth/tokens.js';

/** An error with its HTTP status and stable code: `{error: code, message, ...extra}`. */
export class HttpError extends Error {
  constructor(
    readonly status: number,
    readonly code: string,
    message: string,
    readonly extra: Record<string, unknown> = {},
    /** Already written to the audit trail by the code that refused (see checkouts.deny). */
    readonly audited = false,
  ) {
    super(message);
  }
}

/** Called for every refused request (4xx) that its route did not audit itself. */
export type RefusalAudit = (req: FastifyRequest, status: number, code: string, message: string) => Promise<void>;

declare module 'fastify' {
  interface FastifyRequest {
    rawBody?: string;
  }
}

export function parse<T extends z.ZodType>(schema: T, value: unknown): z.infer<T> {
  const res = schema.safeParse(value ?? {});
  if (!res.success) throw new HttpError(400, 'invalid', zodMessage(res.error));
  return res.data;
}

/** JSON bodies keep their raw text (device signatures cover the exact bytes); errors are uniform. */
export async function installHttpBasics(app: FastifyInstance, audit?: RefusalAudit): Promise<void> {
  acceptOnlyOurMediaTypes(app);
  app.removeContentTypeParser('application/json');
  app.addContentTypeParser('application/json', { parseAs: 'string' }, (req, body, done) => {
    const text = String(body);
    req.rawBody = text;
    if (text.length === 0) return done(null, {});
    try {
      done(null, JSON.parse(text));
    } catch {
      done(new HttpError(400, 'malformed-json', 'request body is not valid JSON'), undefined);
    }
  });
  app.setErrorHandler(async (err: Error & { statusCode?: number; code?: string }, req, reply) => {
    const refuse = async (status: number, code: string, message: string, extra: Record<string, unknown> = {}) => {
      if (!(err instanceof HttpError && err.audited)) await audit?.(req, status, code, message);
      return reply.status(status).send({ error: code, message, ...extra });
    };
    // One mapping for broker and transfer servers (src/net/http-errors.ts): 4xx client, 5xx server.
    const m = mapError(err);
    if (m.status === 413) drainRefusedBody(req, reply);
    if (m.status < 500) return refuse(m.status, m.code, m.message, err instanceof HttpError ? err.extra : {});
    req.log.error(err);
    return reply.status(m.status).send({ error: m.code, message: m.message });
  });
  app.setNotFoundHandler((req, reply) => reply.status(404).send({ error: 'not-found', message: `no route ${req.method} ${req.url}` }));
}

export async function requireUser(ctx: BrokerContext, req: FastifyRequest): Promise<SessionClaims> {
  const auth = req.headers.authorization ?? '';
  const claims = auth.startsWith('Bearer ') ? readToken(ctx.secrets.tokenKey, auth.slice(7)) : null;
  if (!claims) throw new HttpError(401, 'unauthenticated', 'log in first (missing, invalid or expired session token)');
  const user = await ctx.meta.getUser(claims.sub);
  if (!user || user.disabled) throw new HttpError(401, 'unauthenticated', 'user is disabled or no longer exists');
  // A session opened on a device that has since been revoked stops at once, like a disabled user's.
  if (claims.dev && (await ctx.meta.deviceRevokedAt(claims.dev))) throw new HttpError(403, 'device-revoked', 'this session belongs to a revoked device');
  return { ...claims, role: user.role };
}

export async function requireAdmin(ctx: BrokerContext, req: FastifyRequest): Promise<SessionClaims> {
  const claims = await requireUser(ctx, req);
  if (claims.role !== 'admin') {
    await ctx.audit({ actor: claims.sub, action: 'admin-access', outcome: 'denied', detail: `${req.method} ${req.url}` });
    throw new HttpError(403, 'forbidden', 'this needs the admin role');
  }
  return claims;
}

/**
 * Verifies an agent request signed by an enrolled device's key, with a nonce not seen before
 * (a replay within the time window is refused). A revoked device is refused too, except where
 * `allowRevoked` (the heartbeat and command acks: how its `lock` reaches it).
 */
export async function requireDevice(ctx: BrokerContext, req: FastifyRequest, opts: { allowRevoked?: boolean } = {}): Promise<DeviceRow & { revoked: boolean }> {
  const id = req.headers[DEVICE_HEADER];
  const device = typeof id === 'string' ? await ctx.meta.getDevice(id) : null;
  if (!device) throw new HttpError(401, 'device-unknown', 'device is not enrolled');
  const nonce = header(req, NONCE_HEADER);
  let failure = checkDeviceSignature(
    publicKeyFromBase64(device.publicKey),
    req.method,
    req.url.split('?')[0]!,
    header(req, TIME_HEADER),
    header(req, SIGNATURE_HEADER),
    req.rawBody ?? '',
    new Date(),
    nonce,
  );
  // Nonces live in the database: a replay is refused by whichever broker it reaches.
  if (!failure && !(await ctx.meta.acceptNonce(device.id, nonce!, MAX_SKEW_MS))) failure = 'replay';
  const revoked = Boolean(await ctx.meta.deviceRevokedAt(device.id));
  if (!failure && revoked && !opts.allowRevoked) failure = 'revoked';
  if (failure === 'revoked') {
    await ctx.audit({ actor: `device:${device.id}`, action: 'device-auth', outcome: 'denied', detail: 'device is revoked' });
    throw new HttpError(403, 'device-revoked', 'this device has been revoked by an administrator', {}, true);
  }
  if (failure) {
    await ctx.audit({ actor: `device:${device.id}`, action: 'device-auth', outcome: 'denied', detail: failure });
    throw new HttpError(401, 'device-signature', `device signature refused (${failure})`, {}, true);
  }
  return { ...device, revoked };
}

function header(req: FastifyRequest, name: string): string | undefined {
  const v = req.headers[name];
  return typeof v === 'string' ? v : undefined;
}
