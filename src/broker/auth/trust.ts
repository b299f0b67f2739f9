import type { CheckoutRow } from '../db/metadata.js';
import type { JobSummary } from '../../transfer/scopes.js';
import type { BrokerContext } from '../context.js';
import { HttpError } from '../http.js';
import { describePolicySource, effectivePolicy } from '../policies.js';
import type { SessionClaims } from './tokens.js';

/**
 * Cut-off: a disabled (or deleted) user, a removed entitlement or a revoked device ends the right
 * to leases, tickets and logins at once, and the laptop gets `lock` at its next heartbeat.
 */

/** Why this checkout's holder may no longer use it, or null while they may. */
export async function cutOffReason(ctx: BrokerContext, c: Pick<CheckoutRow, 'user' | 'deviceId' | 'desktopId'>): Promise<string | null> {
  const user = await ctx.meta.getUser(c.user);
  if (!user) return `user ${c.user} no longer exists`;
  if (user.disabled) return `user ${c.user} is disabled`;
  const device = await ctx.meta.getDevice(c.deviceId);
  if (!device) return `device ${c.deviceId} no longer exists`;
  if (await ctx.meta.deviceRevokedAt(c.deviceId)) return `device ${c.deviceId} is revoked`;
  const desktop = await ctx.meta.getDesktop(c.desktopId);
  if (!desktop) return `desktop ${c.desktopId} no longer exists`;
  if (!(await ctx.meta.isEntitled(c.user, desktop))) return `${c.user} is no longer entitled to ${desktop.name}`;
  return null;
}

/** The active checkouts (of those `only` picks) whose holders may still use them. */
export async function stillAllowed(ctx: BrokerContext, only: (c: CheckoutRow) => boolean): Promise<CheckoutRow[]> {
  const out: CheckoutRow[] = [];
  for (const c of (await ctx.meta.listCheckouts({ activeOnly: true })).filter(only)) if (!(await cutOffReason(ctx, c))) out.push(c);
  return out;
}

/**
 * Applies cut-off to every active checkout that lost its right: its transfer jobs end (their
 * tickets are revoked), a `lock` command is queued for the device (delivered at the next
 * heartbeat), and it is audited, once per checkout. Called after every admin change that can
 * take rights away, and at every heartbeat.
 */
export async function enforceCutOff(ctx: BrokerContext, actor: string, only: (c: CheckoutRow) => boolean = () => true): Promise<number> {
  let n = 0;
  for (const c of (await ctx.meta.listCheckouts({ activeOnly: true })).filter(only)) {
    const reason = await cutOffReason(ctx, c);
    const already = await ctx.meta.checkoutCutOffAt(c.id);
    // Rights given back (re-enabled, re-entitled): a later cut-off applies again.
    if (!reason && already) await ctx.meta.setCheckoutCutOff(c.id, null);
    if (!reason || already) continue;
    await ctx.meta.setCheckoutCutOff(c.id, new Date().toISOString());
    await ctx.scheduler.finishForCheckout(c.id, 'cancelled');
    if (await ctx.meta.getDevice(c.deviceId)) await ctx.meta.queueCommand({ deviceId: c.deviceId, desktopId: c.desktopId, type: 'lock' });
    await ctx.audit({ actor, desktopId: c.desktopId, action: 'cut-off', outcome: 'ok', detail: `checkout ${c.id}: ${reason}; transfers ended, lock queued for device ${c.deviceId}` });
    n++;
  }
  return n;
}

export async function revokeDevice(ctx: BrokerContext, actor: string, deviceId: string): Promise<boolean> {
  const changed = await ctx.meta.revokeDevice(deviceId);
  if (changed) await ctx.audit({ actor, action: 'device-revoke', outcome: 'ok', detail: `device ${deviceId}` });
  await enforceCutOff(ctx, actor);
  return changed;
}

/**
 * A transfer server's heartbeat: audit the per-job chunk access it reports (one event per job,
 * summarized), and answer with the jobs whose tickets it must refuse from now on.
 */
export async function transferServerSync(ctx: BrokerContext, serverId: string, summaries: JobSummary[]): Promise<string[]> {
  for (const s of summaries) {
    await ctx.audit({
      actor: `transfer:${serverId}`, desktopId: s.desktopId, action: 'chunk-access', outcome: 'info',
      detail: `job ${s.jobId} checkout ${s.checkoutId} (${s.direction}, ${s.reason}): ${s.chunksOut} chunks / ${s.bytesOut} bytes served, ${s.chunksIn} chunks / ${s.bytesIn} bytes accepted, ${s.firstAt} – ${s.lastAt}`,
    });
  }
  return ctx.scheduler.revokedJobIds();
}

/**
 * requireOnlineReauth: check-in, replicate and rollback (sensitive after an offline login) need a
 * session from a password check within `reauthWindowSec`, and, when the session names a device,
 * the checkout's own device. The client logs in with the password right before each of them.
 */
export async function requireFreshLogin(ctx: BrokerContext, claims: SessionClaims, checkoutId: string, action: string): Promise<void> {
  const c = await ctx.meta.getCheckout(checkoutId);
  if (!c || c.user !== claims.sub) return; // the action itself refuses (404 / not-holder)
  const policy = await effectivePolicy(ctx.meta, claims.sub, await ctx.meta.getDesktop(c.desktopId));
  if (!policy.requireOnlineReauth.value) return;
  const age = Date.now() / 1000 - (claims.iat ?? 0);
  const why = age > ctx.settings.reauthWindowSec ? `the password was last checked ${Math.round(age)} s ago (more than ${ctx.settings.reauthWindowSec} s)`
    : claims.dev && claims.dev !== c.deviceId ? 'this session was opened on another device' : null;
  if (!why) return;
  await ctx.audit({ actor: claims.sub, desktopId: c.desktopId, action, outcome: 'denied', detail: `reauth-required: ${why}` });
  throw new HttpError(403, 'reauth-required', `policy (${await describePolicySource(ctx.meta, policy.requireOnlineReauth.source)}) requires a fresh online login for ${action}: ${why}; log in again`, {}, true);
}
