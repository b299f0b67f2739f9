import type { FastifyPluginAsync } from 'fastify';
import { z } from 'zod';
import { policyValues } from '../../../core/policy.js';
import type { BrokerContext } from '../../context.js';
import { HttpError, parse } from '../../http.js';
import { deviceOf } from './agent-scope.js';
import { effectivePolicy } from '../../policies.js';
import { issueLease } from '../../checkouts.js';
import { enforceCutOff, stillAllowed } from '../../auth/trust.js';
import { endWipedCheckout } from '../../desktops/wipe.js';
import { VERSION_RE } from '../../../core/tokens/release.js';
import { offerOf } from '../releases.js';

const Heartbeat = z.object({
  host: z.object({
    os: z.string().max(200).optional(), cpus: z.number().int().min(1), ramBytes: z.number().min(0), freeDiskBytes: z.number().min(0), loadAvg: z.array(z.number()).max(3).optional(),
    /** What the laptop can offer a desktop's screen and USB (devices/hardware.ts); older agents leave it out. */
    display: z.object({ windowSystem: z.enum(['wayland', 'x11']).nullable(), monitors: z.number().int().min(0).max(64), gl: z.boolean().nullable() }).strict().optional(),
    usb: z.array(z.object({ id: z.string().regex(/^[0-9a-f]{4}:[0-9a-f]{4}$/), classes: z.array(z.string().regex(/^[0-9a-f]{2}$/)).max(32), name: z.string().max(200).optional() }).strict()).max(64).optional(),
  }),
  vaultBytes: z.number().min(0),
  desktops: z.array(z.object({
    desktopId: z.string().max(200), checkoutId: z.string().max(200), state: z.string().max(40), dirtyBytes: z.number().min(0),
    percentLocal: z.number().min(0).max(100), lastReplicationAt: z.string().max(40).optional(), readFailures: z.number().int().min(0).optional(),
  })).max(64),
  /** What happened offline since the last contact (unlock, run, export, …): goes to the audit trail. */
  events: z.array(z.object({
    time: z.string().max(40), action: z.string().regex(/^[a-z][a-z-]{0,39}$/), desktopId: z.string().max(200).optional(), detail: z.string().max(1000).optional(),
  }).strict()).max(500).optional(),
  /** The Carryon version the device runs (older agents leave it out). */
  client: z.object({ version: z.string().regex(VERSION_RE) }).strict().optional(),
}).strict();

/**
 * A device's offline events go to the audit trail only for desktops it holds, or held last (events
 * queued before a check-in arrive after it): a device must not write history for other users'
 * desktops. The others are dropped, and that a device tried is itself audited.
 */
async function fileOfflineEvents(ctx: BrokerContext, device: { id: string; user: string }, events: NonNullable<z.infer<typeof Heartbeat>['events']>): Promise<void> {
  const holds = new Map<string, boolean>();
  const refused: string[] = [];
  for (const e of events) {
    if (e.desktopId !== undefined) {
      if (!holds.has(e.desktopId)) holds.set(e.desktopId, (await ctx.meta.latestCheckout(e.desktopId))?.deviceId === device.id);
      if (!holds.get(e.desktopId)) {
        refused.push(`${e.action} on ${e.desktopId}`);
        continue;
      }
    }
    await ctx.audit({ actor: `device:${device.id}`, desktopId: e.desktopId ?? null, action: `offline-${e.action}`, outcome: 'info', detail: `reported by ${device.user}'s device at ${e.time}${e.detail ? `: ${e.detail}` : ''}` });
  }
  if (refused.length > 0) {
    await ctx.audit({ actor: `device:${device.id}`, action: 'offline-events', outcome: 'denied', detail: `${refused.length} event(s) for desktops this device does not hold, dropped: ${refused.slice(0, 10).join(', ').slice(0, 800)}` });
  }
}

/** Agent endpoints: device-signed (the agent scope's hook checks it), outbound from the laptop only. */
export const agentRoutes: FastifyPluginAsync<{ ctx: BrokerContext }> = async (app, { ctx }) => {
  // A revoked device still reaches its heartbeat: that is how its `lock` command gets to it.
  app.post('/v1/agent/heartbeat', { config: { revokedDeviceAllowed: true } }, async (req) => {
    const device = deviceOf(req);
    const body = parse(Heartbeat, req.body);
    await ctx.meta.touchDevice(device.id, body.host);
    const { events, client, ...stats } = body;
    if (client) await ctx.releases.store.setRunning(device.id, client.version);
    await ctx.meta.addHeartbeat(device.id, stats);
    await fileOfflineEvents(ctx, device, events ?? []);
    await enforceCutOff(ctx, 'system', (c) => c.deviceId === device.id);
    if (device.revoked) {
      const commands = (await ctx.meta.pendingCommands(device.id)).filter((c) => c.type === 'lock' || c.type === 'wipe').map((c) => ({ id: c.id, type: c.type, desktopId: c.desktopId ?? undefined }));
      // deviceRevoked: the laptop erases its parked copies (client/parked.ts), which no check-out can open any more.
      return { heartbeatIntervalSec: (await effectivePolicy(ctx.meta, device.user, null)).heartbeatIntervalSec.value, policies: {}, commands, deviceRevoked: true };
    }
    const held = await stillAllowed(ctx, (c) => c.deviceId === device.id);
    for (const c of held) await ctx.meta.setCheckoutHeartbeat(c.id);
    const policies: Record<string, ReturnType<typeof policyValues>> = {};
    for (const c of held) policies[c.desktopId] = policyValues(await effectivePolicy(ctx.meta, c.user, await ctx.meta.getDesktop(c.desktopId)));
    const intervals = Object.values(policies).map((p) => p.heartbeatIntervalSec);
    const heartbeatIntervalSec = intervals.length ? Math.min(...intervals) : (await effectivePolicy(ctx.meta, device.user, null)).heartbeatIntervalSec.value;
    const commands = (await ctx.meta.pendingCommands(device.id)).map((c) => ({ id: c.id, type: c.type, desktopId: c.desktopId ?? undefined }));
    // The newest release rolled out to its ring and newer than what it runs (none to older agents, which cannot install it).
    const offer = client ? await ctx.releases.store.offerFor((await ctx.releases.store.device(device.id)).ring, client.version) : null;
    return { heartbeatIntervalSec, policies, commands, ...(offer ? { update: offerOf(offer) } : {}) };
  });

  app.post('/v1/agent/lease', async (req) => {
    const device = deviceOf(req);
    parse(z.object({}).strict(), req.body);
    // The device proves itself by signature; the lease covers what its user holds on it and may
    // still use (a disabled user, a removed entitlement or a revoked device get nothing).
    const user = await ctx.meta.getUser(device.user);
    if (!user || user.disabled) {
      await ctx.audit({ actor: `device:${device.id}`, action: 'lease-renew', outcome: 'denied', detail: `user ${device.user} is disabled or gone` });
      throw new HttpError(403, 'unauthenticated', 'the user of this device is disabled', {}, true);
    }
    const lease = await issueLease(ctx, device.user, device.id);
    if (lease) await ctx.audit({ actor: `device:${device.id}`, action: 'lease-renew', outcome: 'ok', detail: `agent, for ${device.user} until ${lease.deadline}` });
    return { lease: lease?.lease ?? null };
  });

  app.post('/v1/agent/commands/:id/ack', { config: { revokedDeviceAllowed: true } }, async (req) => {
    const device = deviceOf(req);
    const { id } = parse(z.object({ id: z.string().max(200) }), req.params);
    const body = parse(z.object({ ok: z.boolean(), message: z.string().max(2000).optional() }).strict(), req.body);
    const command = (await ctx.meta.pendingCommands(device.id)).find((c) => c.id === id);
    const notPending = () => new HttpError(404, 'not-found', 'no pending command with that id for this device');
    if (!command) throw notPending();
    // A done wipe closes the loop: the check-out it erased ends, and the command's result says so.
    const ended = body.ok && command.type === 'wipe' && command.desktopId ? await endWipedCheckout(ctx, device.id, command.desktopId, id) : null;
    const result = ended ? `${body.message ?? 'wipe done'}; ${ended}` : body.message ?? null;
    if (!await ctx.meta.ackCommand(id, device.id, body.ok, result)) throw notPending();
    await ctx.audit({ actor: `device:${device.id}`, desktopId: command.desktopId, action: 'command-ack', outcome: body.ok ? 'ok' : 'failed', detail: `${id} (${command.type})${body.message ? `: ${body.message}` : ''}` });
    return { ok: true };
  });
};
