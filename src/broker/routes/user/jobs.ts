import type { FastifyRequest, FastifyPluginAsync } from 'fastify';
import { z } from 'zod';
import { auditTicket } from '../../upload-rules.js';
import type { BrokerContext } from '../../context.js';
import { HttpError, parse } from '../../http.js';
import { userOf } from './user-scope.js';
import { cutOffReason, enforceCutOff } from '../../auth/trust.js';

const Id = z.object({ id: z.string().min(1).max(200) });
const Bytes = z.number().int().min(0).max(Number.MAX_SAFE_INTEGER);
const LocalProgress = z.object({ bytesLocal: Bytes, bytesTotal: Bytes, bytesReceived: Bytes.optional(), bytesCopiedLocally: Bytes.optional() }).strict().refine((p) => p.bytesLocal <= p.bytesTotal, 'bytesLocal exceeds bytesTotal');

/**
 * Transfer jobs: only the holder of the job's checkout sees or touches it (and gets its tickets);
 * an admin may see and pause/resume it, without a ticket. Anyone else gets 404, audited.
 */
export const jobRoutes: FastifyPluginAsync<{ ctx: BrokerContext }> = async (app, { ctx }) => {
  const jobOf = async (req: FastifyRequest, action: string) => {
    const claims = userOf(req);
    const { id } = parse(Id, req.params);
    const checkoutId = await ctx.scheduler.checkoutOf(id);
    const c = checkoutId ? await ctx.meta.getCheckout(checkoutId) : null;
    const holder = Boolean(c && c.user === claims.sub);
    if (!c || (!holder && claims.role !== 'admin')) {
      await ctx.audit({ actor: claims.sub, desktopId: c?.desktopId ?? null, action, outcome: 'denied', detail: `job ${id}: ${c ? 'not the holder of its checkout' : 'no such job'}` });
      throw new HttpError(404, 'not-found', 'no such job of yours', {}, true);
    }
    if (holder && action !== 'transfer-pause') {
      const reason = await cutOffReason(ctx, c);
      if (reason) {
        await enforceCutOff(ctx, 'system');
        await ctx.audit({ actor: claims.sub, desktopId: c.desktopId, action, outcome: 'denied', detail: `job ${id}: cut off: ${reason}` });
        throw new HttpError(403, 'cut-off', `no more transfers for this checkout: ${reason}`, {}, true);
      }
    }
    return { claims, c, id, holder };
  };
  /** Tickets go to the holder only; each one handed out is audited. */
  const answer = async (who: Awaited<ReturnType<typeof jobOf>>, job: Awaited<ReturnType<BrokerContext['scheduler']['get']>>) => {
    if (!job) throw new HttpError(404, 'not-found', 'no such job');
    if (!who.holder) return { ...job, transfer: undefined };
    await auditTicket(ctx, who.claims.sub, who.c.desktopId, job);
    return job;
  };

  app.get('/v1/jobs/:id', async (req) => {
    const who = await jobOf(req, 'job-view');
    return await answer(who, await ctx.scheduler.get(who.id));
  });
  // The holder's laptop says how much of the desktop it holds (once a second while filling): the
  // percentage every admin view shows. Not audited (it is only a number for the views).
  app.post('/v1/jobs/:id/progress', async (req) => {
    const body = parse(LocalProgress, req.body);
    const who = await jobOf(req, 'job-progress');
    if (!who.holder) throw new HttpError(403, 'forbidden', 'only the laptop holding the check-out reports its progress');
    ctx.jobProgress.reportLocal(who.id, body);
    return { ok: true };
  });
  for (const op of ['pause', 'resume'] as const) {
    app.post(`/v1/jobs/:id/${op}`, async (req) => {
      const who = await jobOf(req, `transfer-${op}`);
      const job = await ctx.scheduler[op](who.id);
      await ctx.audit({ actor: who.claims.sub, desktopId: who.c.desktopId, action: `transfer-${op}`, outcome: 'ok', detail: `job ${who.id}${who.holder ? '' : ` (checkout held by ${who.c.user})`}` });
      return await answer(who, job);
    });
  }
};
