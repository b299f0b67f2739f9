import { createHmac, timingSafeEqual } from 'node:crypto';
import { z } from 'zod';

export const SessionClaims = z.object({
  sub: z.string(),
  role: z.enum(['admin', 'user']),
  /** 'online' sessions come from a password check against the broker. */
  exp: z.number(),
  /** When the password was checked (seconds): requireOnlineReauth wants it recent. */
  iat: z.number().optional(),
  dev: z.string().optional(),
});
export type SessionClaims = z.infer<typeof SessionClaims>;

/** Short-lived bearer: base64url(JSON claims) "." base64url(HMAC-SHA-256). */
export function issueToken(key: Buffer, claims: SessionClaims): string {
  const body = Buffer.from(JSON.stringify(claims)).toString('base64url');
  return `${body}.${createHmac('sha256', key).update(body).digest('base64url')}`;
}

export function readToken(key: Buffer, token: string, now = Date.now()): SessionClaims | null {
  const [body, mac] = token.split('.');
  if (!body || !mac) return null;
  const expected = createHmac('sha256', key).update(body).digest();
  const got = Buffer.from(mac, 'base64url');
  if (got.length !== expected.length || !timingSafeEqual(got, expected)) return null;
  try {
    const claims = SessionClaims.parse(JSON.parse(Buffer.from(body, 'base64url').toString('utf8')));
    return claims.exp * 1000 > now ? claims : null;
  } catch {
    return null;
  }
}
