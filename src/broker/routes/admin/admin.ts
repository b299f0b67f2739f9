import type { FastifyRequest, FastifyPluginAsync } from 'fastify';
import { z } from 'zod';
import { PolicyLayer } from '../../../core/policy.js';
import { checkoutView, forceUnlock } from '../../checkouts.js';
import type { BrokerContext } from '../../context.js';
import type { ImportJobs } from '../../desktops/imports.js';
import { cloneDesktop, createDesktopFromImage, rotateLineageKey } from '../../desktops/desktops.js';
import { HttpError, parse } from '../../http.js';
import { adminOf } from './admin-scope.js';
import { hashPassword } from '../../auth/passwords.js';
import { SafeName } from '../../desktops/names.js';
import { resolveImportPath } from '../../desktops/import-paths.js';
import { enforceCutOff } from '../../auth/trust.js';
import { effectivePolicy } from '../../policies.js';
import { checkoutFailures } from '../../desktops/damage.js';
import { checkoutTransfers } from '../../transfers/overview.js';

const Name = SafeName;
const Id = z.object({ id: z.string().min(1).max(200) });
const Config = z.object({
  vcpus: z.number().int().min(1).max(256).default(2),
  ramMiB: z.number().int().min(64).max(1 << 20).default(2048),
  minRamMiB: z.number().int().min(64).max(1 << 20).default(512),
  nic: z.enum(['user', 'none']).default('user'),
  usb: z.boolean().default(false),
}).strict();

/** Admin API: directory, desktops, entitlements, policies, checkouts, devices, commands, events. */
export const adminRoutes: FastifyPluginAsync<{ ctx: BrokerContext; imports: ImportJobs }> = async (app, { ctx, imports }) => {
  // The admin scope's hook checked the session (routes/admin-scope.ts); this names the admin.
  const admin = async (req: FastifyRequest) => adminOf(req);

  app.get('/v1/admin/users', async (req) => (await admin(req), { users: (await ctx.meta.listUsers()).map(({ passwordHash: _, ...u }) => u) }));
  app.post('/v1/admin/users', async (req, reply) => {
    const actor = await admin(req);
    const b = parse(z.object({ name: Name, password: z.string().min(8, 'at least 8 characters').max(1024), role: z.enum(['admin', 'user']).default('user') }).strict(), req.body);
    if (await ctx.meta.getUser(b.name)) throw new HttpError(409, 'exists', `user ${b.name} exists`);
    await ctx.meta.createUser({ name: b.name, passwordHash: await hashPassword(b.password, { N: ctx.settings.passwordCostN }), role: b.role });
    await ctx.audit({ actor, action: 'user-create', outcome: 'ok', detail: b.name });
    return reply.status(201).send({ name: b.name, role: b.role });
  });
  app.patch('/v1/admin/users/:id', async (req) => {
    const actor = await admin(req);
    const { id } = parse(Id, req.params);
    const b = parse(z.object({ password: z.string().min(8).max(1024).optional(), role: z.enum(['admin', 'user']).optional(), disabled: z.boolean().optional(), policy: PolicyLayer.optional() }).strict(), req.body);
    const ok = await ctx.meta.updateUser(id, { ...b, passwordHash: b.password ? await hashPassword(b.password, { N: ctx.settings.passwordCostN }) : undefined });
    if (!ok) throw new HttpError(404, 'not-found', `no user ${id}`);
    await ctx.audit({ actor, action: 'user-update', outcome: 'ok', detail: `${id}: ${Object.keys(b).join(', ')}` });
    await enforceCutOff(ctx, actor); // a disabled user loses leases, tickets and logins now
    return { ok: true };
  });
  app.delete('/v1/admin/users/:id', async (req) => {
    const actor = await admin(req);
    const { id } = parse(Id, req.params);
    if ((await ctx.meta.listCheckouts({ activeOnly: true })).some((c) => c.user === id)) throw new HttpError(409, 'busy', `${id} holds a checkout`);
    if (!await ctx.meta.deleteUser(id)) throw new HttpError(404, 'not-found', `no user ${id}`);
    await ctx.audit({ actor, action: 'user-delete', outcome: 'ok', detail: id });
    return { ok: true };
  });

  app.get('/v1/admin/groups', async (req) => (await admin(req), { groups: await ctx.meta.listGroups() }));
  app.post('/v1/admin/groups', async (req, reply) => {
    const actor = await admin(req);
    const b = parse(z.object({ name: Name, members: z.array(Name).default([]) }).strict(), req.body);
    if (!(await ctx.meta.listGroups()).some((g) => g.name === b.name)) await ctx.meta.createGroup(b.name);
    for (const m of b.members) {
      if (!await ctx.meta.getUser(m)) throw new HttpError(404, 'not-found', `no user ${m}`);
      await ctx.meta.addGroupMember(b.name, m);
    }
    await ctx.audit({ actor, action: 'group-update', outcome: 'ok', detail: `${b.name} += ${b.members.join(',')}` });
    return reply.status(201).send({ name: b.name });
  });

  app.get('/v1/admin/pools', async (req) => (await admin(req), { pools: await ctx.meta.listPools() }));
  app.post('/v1/admin/pools', async (req, reply) => {
    const actor = await admin(req);
    const b = parse(z.object({ name: Name, policy: PolicyLayer.default({}) }).strict(), req.body);
    if (await ctx.meta.getPool(b.name)) throw new HttpError(409, 'exists', `pool ${b.name} exists`);
    const id = await ctx.meta.createPool(b.name, b.policy);
    await ctx.audit({ actor, action: 'pool-create', outcome: 'ok', detail: b.name });
    return reply.status(201).send({ id, name: b.name });
  });

  app.get('/v1/admin/desktops', async (req) => {
    await admin(req);
    const desktops = await Promise.all((await ctx.meta.listDesktops()).map(async (d) => {
      const c = await ctx.meta.activeCheckout(d.id);
      return { ...d, checkout: c ? checkoutView(c) : null };
    }));
    return { desktops };
  });
  app.get('/v1/admin/desktops/:id', async (req) => {
    await admin(req);
    const d = await ctx.meta.getDesktop(parse(Id, req.params).id);
    if (!d) throw new HttpError(404, 'not-found', 'no such desktop');
    const c = await ctx.meta.activeCheckout(d.id);
    return { ...d, snapshots: await ctx.meta.listSnapshots(d.id), checkout: c ? checkoutView(c) : null, policy: await effectivePolicy(ctx.meta, null, d) };
  });
  app.post('/v1/admin/desktops', async (req, reply) => {
    const actor = await admin(req);
    const b = parse(z.object({
      name: Name, image: z.string().min(1).max(4096).optional(), cloneOf: z.string().max(200).optional(), pool: z.string().max(200).optional(),
      config: Config.default({ vcpus: 2, ramMiB: 2048, minRamMiB: 512, nic: 'user', usb: false }), chunkSize: z.number().int().optional(),
      background: z.boolean().optional(),
    }).strict().refine((v) => Boolean(v.image) !== Boolean(v.cloneOf), 'give exactly one of image or cloneOf'), req.body);
    if (b.cloneOf) return reply.status(201).send(await cloneDesktop(ctx, actor, b.cloneOf, b.name, b.pool));
    // A path on the broker host: only inside the configured import directories (uploads have their own route).
    const spec = { name: b.name, image: await resolveImportPath(ctx, b.image!), pool: b.pool, config: b.config, chunkSize: b.chunkSize };
    // `background`: answer at once with an import job to poll (large images take minutes).
    if (b.background) return reply.status(202).send({ import: await imports.start(ctx, actor, spec) });
    await imports.ensureNameFree(ctx, b.name);
    return reply.status(201).send(await createDesktopFromImage(ctx, actor, spec));
  });
  app.get('/v1/admin/imports', async (req) => {
    await admin(req);
    return { imports: imports.list() };
  });
  app.get('/v1/admin/imports/:id', async (req) => {
    await admin(req);
    const job = imports.get(parse(Id, req.params).id);
    if (!job) throw new HttpError(404, 'not-found', 'no such import');
    return { import: job };
  });
  app.delete('/v1/admin/desktops/:id', async (req) => {
    const actor = await admin(req);
    const d = await ctx.meta.getDesktop(parse(Id, req.params).id);
    if (!d) throw new HttpError(404, 'not-found', 'no such desktop');
    if (await ctx.meta.activeCheckout(d.id)) throw new HttpError(409, 'locked', `${d.name} is checked out`);
    await ctx.meta.deleteDesktop(d.id);
    await ctx.audit({ actor, desktopId: d.id, action: 'desktop-delete', outcome: 'ok', detail: d.name });
    return { ok: true };
  });
  app.post('/v1/admin/desktops/:id/rotate-key', async (req) => await rotateLineageKey(ctx, await admin(req), parse(Id, req.params).id));
  // Power (on, off, reset, shutdown) lives with the desktop hosts: routes/hosts.ts.

  app.get('/v1/admin/entitlements', async (req) => (await admin(req), { entitlements: await ctx.meta.listEntitlements() }));
  app.post('/v1/admin/entitlements', async (req, reply) => {
    const actor = await admin(req);
    const b = parse(z.object({ principalType: z.enum(['user', 'group']), principal: Name, targetType: z.enum(['desktop', 'pool']), target: z.string().min(1).max(200) }).strict(), req.body);
    const target = b.targetType === 'desktop' ? (await ctx.meta.getDesktop(b.target))?.id : (await ctx.meta.getPool(b.target))?.id;
    if (!target) throw new HttpError(404, 'not-found', `no ${b.targetType} ${b.target}`);
    const id = await ctx.meta.addEntitlement({ ...b, target });
    await ctx.audit({ actor, action: 'entitle', outcome: 'ok', detail: `${b.principalType}:${b.principal} → ${b.targetType}:${b.target}` });
    return reply.status(201).send({ id });
  });
  app.delete('/v1/admin/entitlements/:id', async (req) => {
    const actor = await admin(req);
    if (!await ctx.meta.removeEntitlement(parse(Id, req.params).id)) throw new HttpError(404, 'not-found', 'no such entitlement');
    await ctx.audit({ actor, action: 'unentitle', outcome: 'ok' });
    await enforceCutOff(ctx, actor); // whoever held a desktop through it loses leases and tickets now
    return { ok: true };
  });

  // PUT replaces the layer; PATCH changes the keys it names (null takes one out of the layer).
  const PolicyTarget = z.object({ scope: z.enum(['global', 'pool', 'desktop', 'user']), id: z.string().max(200) });
  const PolicyPatch = z.object(Object.fromEntries(Object.entries(PolicyLayer.shape).map(([k, v]) => [k, v.unwrap().nullable().optional()]))).strict();
  const setPolicyLayer = async (actor: string, p: z.infer<typeof PolicyTarget>, change: (old: PolicyLayer) => PolicyLayer) => {
    // The stored layer, read leniently (names no longer in the API are dropped on the next write).
    const stored = (v: unknown) => PolicyLayer.strip().parse(v ?? {});
    const notFound = (what: string) => { throw new HttpError(404, 'not-found', `no ${what} ${p.id}`); };
    let values: PolicyLayer;
    if (p.scope === 'global') {
      values = change(stored(JSON.parse((await ctx.meta.getSetting('policy.global')) ?? '{}')));
      await ctx.meta.setSetting('policy.global', JSON.stringify(values));
    } else if (p.scope === 'pool') {
      const pool = await ctx.meta.getPool(p.id) ?? notFound('pool');
      values = change(stored(pool.policy));
      await ctx.meta.setPoolPolicy(pool.id, values);
    } else if (p.scope === 'desktop') {
      const d = await ctx.meta.getDesktop(p.id) ?? notFound('desktop');
      values = change(stored(d.policy));
      await ctx.meta.setDesktopPolicy(d.id, values);
    } else {
      const u = await ctx.meta.getUser(p.id) ?? notFound('user');
      values = change(stored(u.policy));
      if (!await ctx.meta.updateUser(p.id, { policy: values })) notFound('user');
    }
    await ctx.audit({ actor, action: 'policy-set', outcome: 'ok', detail: `${p.scope}:${p.id} ${JSON.stringify(values)}` });
    return { ok: true, policy: values };
  };
  app.put('/v1/admin/policies/:scope/:id', async (req) => {
    const actor = await admin(req);
    const values = parse(PolicyLayer, req.body);
    return setPolicyLayer(actor, parse(PolicyTarget, req.params), () => values);
  });
  app.patch('/v1/admin/policies/:scope/:id', async (req) => {
    const actor = await admin(req);
    const patch = parse(PolicyPatch, req.body);
    return setPolicyLayer(actor, parse(PolicyTarget, req.params), (old) => {
      const merged: Record<string, unknown> = { ...old };
      for (const [k, v] of Object.entries(patch)) if (v === null) delete merged[k]; else if (v !== undefined) merged[k] = v;
      return PolicyLayer.parse(merged);
    });
  });
  app.get('/v1/admin/policies/resolve', async (req) => {
    await admin(req);
    const q = parse(z.object({ user: z.string().max(64).optional(), desktop: z.string().max(200).optional() }), req.query);
    const d = q.desktop ? await ctx.meta.getDesktop(q.desktop) : null;
    if (q.desktop && !d) throw new HttpError(404, 'not-found', `no desktop ${q.desktop}`);
    return { policy: await effectivePolicy(ctx.meta, q.user ?? null, d) };
  });

  app.get('/v1/admin/checkouts', async (req) => {
    await admin(req);
    const q = parse(z.object({ all: z.enum(['true', 'false']).optional() }), req.query);
    const failures = await checkoutFailures(ctx);
    // Each with its open transfer job's progress: the same numbers as `GET /v1/admin/transfers`.
    const transfers = await checkoutTransfers(ctx);
    return { checkouts: (await ctx.meta.listCheckouts({ activeOnly: q.all !== 'true' })).map((c) => ({ ...checkoutView(c), failure: failures[c.id] ?? null, transfer: transfers.get(c.id) ?? null })) };
  });
  app.post('/v1/admin/checkouts/:id/force-unlock', async (req) => {
    const actor = await admin(req);
    const b = parse(z.object({ reason: z.string().max(500).optional() }).strict(), req.body);
    return { checkout: await forceUnlock(ctx, actor, parse(Id, req.params).id, b.reason) };
  });

  app.get('/v1/admin/devices', async (req) => {
    await admin(req);
    const devices = await Promise.all((await ctx.meta.listDevices()).map(async (d) => ({ ...d, revokedAt: await ctx.meta.deviceRevokedAt(d.id), latest: (await ctx.meta.latestHeartbeats(d.id, 1))[0] ?? null })));
    return { devices };
  });
  app.post('/v1/admin/devices/:id/commands', async (req, reply) => {
    const actor = await admin(req);
    const { id } = parse(Id, req.params);
    const b = parse(z.object({ type: z.enum(['lock', 'unlock', 'wipe', 'replicate', 'renew-lease']), desktopId: z.string().max(200).optional() }).strict(), req.body);
    if (!await ctx.meta.getDevice(id)) throw new HttpError(404, 'not-found', `no device ${id}`);
    const desktop = b.desktopId ? await ctx.meta.getDesktop(b.desktopId) : null;
    if (b.desktopId && !desktop) throw new HttpError(404, 'not-found', `no desktop ${b.desktopId}`);
    const cmd = await ctx.meta.queueCommand({ deviceId: id, desktopId: desktop?.id ?? null, type: b.type });
    await ctx.audit({ actor, desktopId: desktop?.id, action: 'command-queue', outcome: 'ok', detail: `${b.type} → device ${id}` });
    return reply.status(201).send({ id: cmd });
  });
  app.get('/v1/admin/commands', async (req) => (await admin(req), { commands: await ctx.meta.listCommands() }));

  app.get('/v1/admin/events', async (req) => {
    await admin(req);
    const q = parse(z.object({ since: z.coerce.number().int().min(0).optional(), desktop: z.string().max(200).optional(), limit: z.coerce.number().int().min(1).max(10_000).optional(), wait: z.coerce.number().int().min(0).max(30).optional() }), req.query);
    const desktopId = q.desktop ? ((await ctx.meta.getDesktop(q.desktop))?.id ?? q.desktop) : undefined;
    // Long poll for `--follow`: wait up to `wait` seconds for something newer than `since`.
    const deadline = Date.now() + (q.wait ?? 0) * 1000;
    let events = await ctx.meta.listEvents({ sinceId: q.since, desktopId, limit: q.limit });
    while (events.length === 0 && Date.now() < deadline) {
      await new Promise((r) => setTimeout(r, 250));
      events = await ctx.meta.listEvents({ sinceId: q.since, desktopId, limit: q.limit });
    }
    return { events };
  });
};
