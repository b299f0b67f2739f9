import type { FastifyInstance } from 'fastify';
import { z } from 'zod';
import { policyValues } from '../../core/policy.js';
import type { BrokerContext } from '../context.js';
import { HttpError, parse, requireDevice } from '../http.js';
import { effectivePolicy } from '../policies.js';
import { issueLease } from '../checkouts.js';

const Heartbeat = z.object({
  host: z.object({ os: z.string().max(200).optional(), cpus: z.number().int().min(1), ramBytes: z.number().min(0), freeDiskBytes: z.number().min(0), loadAvg: z.array(z.number()).max(3).optional() }),
  vaultBytes: z.number().min(0),
  desktops: z.array(z.object({
    desktopId: z.string().max(200), checkoutId: z.string().max(200), state: z.string().max(40), dirtyBytes: z.number().min(0),
    percentLocal: z.number().min(0).max(100), lastReplicationAt: z.string().max(40).optional(), readFailures: z.number().int().min(0).optional(),
  })).max(64),
}).strict();

/** Agent endpoints: device-signed, outbound from the laptop only. */
export function agentRoutes(app: FastifyInstance, ctx: BrokerContext): void {
  app.post('/v1/agent/heartbeat', async (req) => {
    const device = requireDevice(ctx, req);
    const body = parse(Heartbeat, req.body);
    ctx.meta.touchDevice(device.id, body.host);
    ctx.meta.addHeartbeat(device.id, body);
    const held = ctx.meta.listCheckouts({ activeOnly: true }).filter((c) => c.deviceId === device.id);
    for (const c of held) ctx.meta.setCheckoutHeartbeat(c.id);
    const policies: Record<string, ReturnType<typeof policyValues>> = {};
    for (const c of held) policies[c.desktopId] = policyValues(effectivePolicy(ctx.meta, c.user, ctx.meta.getDesktop(c.desktopId)));
    const intervals = Object.values(policies).map((p) => p.heartbeatIntervalSec);
    const heartbeatIntervalSec = intervals.length ? Math.min(...intervals) : effectivePolicy(ctx.meta, device.user, null).heartbeatIntervalSec.value;
    const commands = ctx.meta.pendingCommands(device.id).map((c) => ({ id: c.id, type: c.type, desktopId: c.desktopId ?? undefined }));
    return { heartbeatIntervalSec, policies, commands };
  });

  app.post('/v1/agent/lease', async (req) => {
    const device = requireDevice(ctx, req);
    parse(z.object({}).strict(), req.body);
    // The device proves itself by signature; the lease covers what its user holds on it.
    return { lease: issueLease(ctx, device.user, device.id)?.lease ?? null };
  });

  app.post('/v1/agent/commands/:id/ack', async (req) => {
    const device = requireDevice(ctx, req);
    const { id } = parse(z.object({ id: z.string().max(200) }), req.params);
    const body = parse(z.object({ ok: z.boolean(), message: z.string().max(2000).optional() }).strict(), req.body);
    if (!ctx.meta.ackCommand(id, device.id, body.ok, body.message ?? null)) throw new HttpError(404, 'not-found', 'no pending command with that id for this device');
    ctx.audit({ actor: `device:${device.id}`, action: 'command-ack', outcome: body.ok ? 'ok' : 'failed', detail: `${id}${body.message ? `: ${body.message}` : ''}` });
    return { ok: true };
  });
}
