import type { CheckoutRow } from '../store/metadata.js';
import type { JobSummary } from '../transfer/scopes.js';
import type { BrokerContext } from './context.js';
import { HttpError } from './http.js';
import { effectivePolicy } from './policies.js';
import type { SessionClaims } from './tokens.js';

/**
 * Cut-off: a disabled (or deleted) user, a removed entitlement or a revoked device ends the right
 * to leases, tickets and logins at once, and the laptop gets `lock` at its next heartbeat.
 */

export function deviceRevokedAt(ctx: BrokerContext, deviceId: string): string | null {
  const r = ctx.meta.db.prepare('SELECT revoked_at FROM devices WHERE id = ?').get(deviceId) as { revoked_at: string | null } | undefined;
  return r?.revoked_at ?? null;
}

/** Why this checkout's holder may no longer use it, or null while they may. */
export function cutOffReason(ctx: BrokerContext, c: Pick<CheckoutRow, 'user' | 'deviceId' | 'desktopId'>): string | null {
  const user = ctx.meta.getUser(c.user);
  if (!user) return `user ${c.user} no longer exists`;
  if (user.disabled) return `user ${c.user} is disabled`;
  const device = ctx.meta.getDevice(c.deviceId);
  if (!device) return `device ${c.deviceId} no longer exists`;
  if (deviceRevokedAt(ctx, c.deviceId)) return `device ${c.deviceId} is revoked`;
  const desktop = ctx.meta.getDesktop(c.desktopId);
  if (!desktop) return `desktop ${c.desktopId} no longer exists`;
  if (!ctx.meta.isEntitled(c.user, desktop)) return `${c.user} is no longer entitled to ${desktop.name}`;
  return null;
}

/**
 * Applies cut-off to every active checkout that lost its right: its transfer jobs end (their
 * tickets are revoked), a `lock` command is queued for the device (delivered at the next
 * heartbeat), and it is audited, once per checkout. Called after every admin change that can
 * take rights away, and at every heartbeat.
 */
export function enforceCutOff(ctx: BrokerContext, actor: string, only: (c: CheckoutRow) => boolean = () => true): number {
  let n = 0;
  for (const c of ctx.meta.listCheckouts({ activeOnly: true }).filter(only)) {
    const reason = cutOffReason(ctx, c);
    const already = ctx.meta.db.prepare('SELECT cut_off_at FROM checkouts WHERE id = ?').get(c.id) as { cut_off_at: string | null } | undefined;
    // Rights given back (re-enabled, re-entitled): a later cut-off applies again.
    if (!reason && already?.cut_off_at) ctx.meta.db.prepare('UPDATE checkouts SET cut_off_at = NULL WHERE id = ?').run(c.id);
    if (!reason || already?.cut_off_at) continue;
    ctx.meta.db.prepare('UPDATE checkouts SET cut_off_at = ? WHERE id = ?').run(new Date().toISOString(), c.id);
    ctx.scheduler.finishForCheckout(c.id, 'cancelled');
    if (ctx.meta.getDevice(c.deviceId)) ctx.meta.queueCommand({ deviceId: c.deviceId, desktopId: c.desktopId, type: 'lock' });
    ctx.audit({ actor, desktopId: c.desktopId, action: 'cut-off', outcome: 'ok', detail: `checkout ${c.id}: ${reason}; transfers ended, lock queued for device ${c.deviceId}` });
    n++;
  }
  return n;
}

export function revokeDevice(ctx: BrokerContext, actor: string, deviceId: string): boolean {
  const changed = ctx.meta.db.prepare('UPDATE devices SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL').run(new Date().toISOString(), deviceId).changes > 0;
  if (changed) ctx.audit({ actor, action: 'device-revoke', outcome: 'ok', detail: `device ${deviceId}` });
  enforceCutOff(ctx, actor);
  return changed;
}

/**
 * A transfer server's heartbeat: audit the per-job chunk access it reports (one event per job,
 * summarized), and answer with the jobs whose tickets it must refuse from now on.
 */
export function transferServerSync(ctx: BrokerContext, serverId: string, summaries: JobSummary[]): string[] {
  for (const s of summaries) {
    ctx.audit({
      actor: `transfer:${serverId}`, desktopId: s.desktopId, action: 'chunk-access', outcome: 'info',
      detail: `job ${s.jobId} checkout ${s.checkoutId} (${s.direction}, ${s.reason}): ${s.chunksOut} chunks / ${s.bytesOut} bytes served, ${s.chunksIn} chunks / ${s.bytesIn} bytes accepted, ${s.firstAt} – ${s.lastAt}`,
    });
  }
  return ctx.scheduler.revokedJobIds();
}

/** Agent requests: each (device, nonce) is accepted once within the signature's time window. */
export class NonceCache {
  private readonly seen = new Map<string, number>();
  private lastSweep = 0;

  constructor(private readonly windowMs: number, private readonly now: () => number = Date.now) {}

  /** True the first time; false for a replay. */
  accept(deviceId: string, nonce: string): boolean {
    const t = this.now();
    if (t - this.lastSweep > 10_000) {
      this.lastSweep = t;
      for (const [k, exp] of this.seen) if (exp <= t) this.seen.delete(k);
    }
    const key = `${deviceId}\n${nonce}`;
    const exp = this.seen.get(key);
    if (exp !== undefined && exp > t) return false;
    // Signatures are accepted for ±window around their time: remember the nonce for twice that.
    this.seen.set(key, t + 2 * this.windowMs);
    return true;
  }

  get size(): number {
    return this.seen.size;
  }
}

/**
 * requireOnlineReauth: check-in, replicate and rollback (sensitive after an offline login) need a
 * session from a password check within `reauthWindowSec`, and, when the session names a device,
 * the checkout's own device. The client logs in with the password right before each of them.
 */
export function requireFreshLogin(ctx: BrokerContext, claims: SessionClaims, checkoutId: string, action: string): void {
  const c = ctx.meta.getCheckout(checkoutId);
  if (!c || c.user !== claims.sub) return; // the action itself refuses (404 / not-holder)
  const policy = effectivePolicy(ctx.meta, claims.sub, ctx.meta.getDesktop(c.desktopId));
  if (!policy.requireOnlineReauth.value) return;
  const age = Date.now() / 1000 - (claims.iat ?? 0);
  const why = age > ctx.settings.reauthWindowSec ? `the password was last checked ${Math.round(age)} s ago (more than ${ctx.settings.reauthWindowSec} s)`
    : claims.dev && claims.dev !== c.deviceId ? 'this session was opened on another device' : null;
  if (!why) return;
  ctx.audit({ actor: claims.sub, desktopId: c.desktopId, action, outcome: 'denied', detail: `reauth-required: ${why}` });
  throw new HttpError(403, 'reauth-required', `policy (${policy.requireOnlineReauth.source}) requires a fresh online login for ${action}: ${why}; log in again`, {}, true);
}
