import { createHmac, hkdfSync } from 'node:crypto';
import type { SessionClaims } from './auth/tokens.js';
import type { BrokerContext } from './context.js';
import type { CheckoutRow } from './db/metadata.js';
import { HttpError } from './http.js';

/** How recent the session's password check must be for the share (the laptop logs in right before). */
export const UNLOCK_LOGIN_MAX_AGE_SEC = 300;
const OPEN_STATES = new Set(['transferring', 'checked_out', 'checking_in']);

/**
 * A check-out's online unlock share (docs/security.md, "Online unlock"). With the laptop's device
 * secret it makes the key of a second wrap of the desktop's keys in the vault, so a command that
 * is online anyway (check-in, replicate, a check-out resumed) opens the vault without the
 * password's scrypt: the broker has just checked the password, with its own rate limits, and
 * stops handing the share out when the check-out ends or the device is revoked. Derived, not
 * stored: every broker of the deployment derives the same from the master key.
 */
export function unlockShare(masterKey: Buffer, c: Pick<CheckoutRow, 'id' | 'deviceId' | 'user'>): string {
  const key = Buffer.from(hkdfSync('sha256', masterKey, Buffer.alloc(0), 'carryon-online-unlock:v1', 32));
  return createHmac('sha256', key).update(`${c.id}\n${c.deviceId}\n${c.user}`).digest('base64');
}

/** The share for the holder of an open check-out, on its device, right after a password check; else an audited refusal. */
export async function releaseUnlockShare(ctx: BrokerContext, claims: SessionClaims, c: CheckoutRow): Promise<{ share: string }> {
  const age = Date.now() / 1000 - (claims.iat ?? 0);
  const revoked = await ctx.meta.deviceRevokedAt(c.deviceId);
  const why = !OPEN_STATES.has(c.state) ? [409, 'wrong-state', `checkout is ${c.state}`] as const
    : revoked ? [403, 'device-revoked', 'the check-out\'s device is revoked'] as const
    : claims.dev !== c.deviceId ? [403, 'wrong-device', 'this session was not opened on the check-out\'s device'] as const
    : !claims.iat || age > UNLOCK_LOGIN_MAX_AGE_SEC ? [403, 'reauth-required', `the password was last checked ${Math.round(age)} s ago: log in again`] as const
    : null;
  if (why) {
    await ctx.audit({ actor: claims.sub, desktopId: c.desktopId, action: 'online-unlock', outcome: 'denied', detail: why[2] });
    throw new HttpError(why[0], why[1], why[2]);
  }
  return { share: unlockShare(ctx.secrets.masterKey, c) };
}

/**
 * The share a parked copy's online wrap opens with (client/vault/parked.ts): the ended check-out's
 * own share, given again only in the answer to a new check-out of the same desktop by the same
 * user on the same device (the parked copy's keys are released by a new check-out's lease, as
 * they always were; this spares that check-out the password's scrypt). Anything else: none, and a
 * mismatch (another user's, device's or desktop's check-out, or one still open) is audited.
 */
export async function parkedUnlockShare(ctx: BrokerContext, user: string, next: { desktopId: string; deviceId: string }, parkedFrom: string): Promise<string | undefined> {
  const c = await ctx.meta.getCheckout(parkedFrom);
  if (!c) return undefined;
  const why = c.desktopId !== next.desktopId || c.user !== user || c.deviceId !== next.deviceId ? 'that check-out is not this user\'s of this desktop on this device'
    : OPEN_STATES.has(c.state) ? `that check-out is still ${c.state}`
    : null;
  if (why) {
    await ctx.audit({ actor: user, desktopId: next.desktopId, action: 'online-unlock', outcome: 'denied', detail: `parked copy of checkout ${parkedFrom}: ${why}` });
    return undefined;
  }
  return unlockShare(ctx.secrets.masterKey, c);
}
