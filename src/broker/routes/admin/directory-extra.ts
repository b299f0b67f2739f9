import type { FastifyPluginAsync } from 'fastify';
import { z } from 'zod';
import type { BrokerContext } from '../../context.js';
import { HttpError, parse } from '../../http.js';
import { adminOf } from './admin-scope.js';

const Name = z.string().min(1).max(200);

/** Removing what the core admin routes only create: groups, group members, pools. */
export const directoryExtraRoutes: FastifyPluginAsync<{ ctx: BrokerContext }> = async (app, { ctx }) => {
  app.delete('/v1/admin/groups/:name', async (req) => {
    const actor = adminOf(req);
    const { name } = parse(z.object({ name: Name }), req.params);
    if (!await ctx.meta.deleteGroup(name)) throw new HttpError(404, 'not-found', `no group ${name}`);
    await ctx.audit({ actor, action: 'group-delete', outcome: 'ok', detail: name });
    return { ok: true };
  });
  app.delete('/v1/admin/groups/:name/members/:user', async (req) => {
    const actor = adminOf(req);
    const p = parse(z.object({ name: Name, user: Name }), req.params);
    if (!(await ctx.meta.listGroups()).some((g) => g.name === p.name)) throw new HttpError(404, 'not-found', `no group ${p.name}`);
    if (!await ctx.meta.removeGroupMember(p.name, p.user)) throw new HttpError(404, 'not-found', `${p.user} is not a member of ${p.name}`);
    await ctx.audit({ actor, action: 'group-update', outcome: 'ok', detail: `${p.name} -= ${p.user}` });
    return { ok: true };
  });
  app.delete('/v1/admin/pools/:id', async (req) => {
    const actor = adminOf(req);
    const { id } = parse(z.object({ id: Name }), req.params);
    const pool = await ctx.meta.getPool(id);
    if (!pool) throw new HttpError(404, 'not-found', `no pool ${id}`);
    const members = (await ctx.meta.listDesktops()).filter((d) => d.poolId === pool.id);
    if (members.length) throw new HttpError(409, 'not-empty', `pool ${pool.name} still holds ${members.map((d) => d.name).join(', ')}; delete or move them first`);
    await ctx.meta.deletePool(pool.id);
    await ctx.audit({ actor, action: 'pool-delete', outcome: 'ok', detail: pool.name });
    return { ok: true };
  });
};
