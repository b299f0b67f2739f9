import type { FastifyRequest, FastifyPluginAsync } from 'fastify';
import { z } from 'zod';
import { auditTicket } from '../../upload-rules.js';
import type { BrokerContext } from '../../context.js';
import type { CheckoutRow } from '../../db/metadata.js';
import { HttpError, parse } from '../../http.js';
import { userOf } from './user-scope.js';
import { cutOffReason, enforceCutOff } from '../../auth/trust.js';

const Id = z.object({ id: z.string().min(1).max(200) });
const Bytes = z.number().int().min(0).max(Number.MAX_SAFE_INTEGER);
const LocalProgress = z.object({ bytesLocal: Bytes, bytesTotal: Bytes, bytesReceived: Bytes.optional(), bytesCopiedLocally: Bytes.optional() }).strict().refine((p) => p.bytesLocal <= p.bytesTotal, 'bytesLocal exceeds bytesTotal');

declare module 'fastify' {
  interface FastifyRequest {
    /** The job named in the path and who asks for it, checked by the job scope's hook. */
    jobCaller?: JobCaller;
  }
  interface FastifyContextConfig {
    /** Job scope: the audit's name for a refused call. */
    jobAction?: string;
    /** Job scope: only the check-out's holder may call this route (admins get 403). */
    holderOnly?: boolean;
  }
}

interface JobCaller { claims: ReturnType<typeof userOf>; c: CheckoutRow; id: string; holder: boolean }

/**
 * Transfer jobs, a scope of their own: its onRequest hook lets through only the holder of the
 * job's check-out, or an admin (who may see and pause/resume it, without a ticket), before the body
 * is read or a handler runs. Anyone else gets 404, audited. A holder whose check-out is cut off may
 * only pause.
 */
export const jobRoutes: FastifyPluginAsync<{ ctx: BrokerContext }> = async (app, { ctx }) => {
  app.addHook('onRoute', (r) => {
    if (!r.config?.jobAction) throw new Error(`${r.url} is in the job scope without a jobAction`);
  });
  app.addHook('onRequest', async (req) => {
    const claims = userOf(req);
    const action = req.routeOptions.config.jobAction ?? 'job';
    const { id } = parse(Id, req.params);
    const checkoutId = await ctx.scheduler.checkoutOf(id);
    const c = checkoutId ? await ctx.meta.getCheckout(checkoutId) : null;
    const holder = Boolean(c && c.user === claims.sub);
    if (!c || (!holder && claims.role !== 'admin')) {
      await ctx.audit({ actor: claims.sub, desktopId: c?.desktopId ?? null, action, outcome: 'denied', detail: `job ${id}: ${c ? 'not the holder of its checkout' : 'no such job'}` });
      throw new HttpError(404, 'not-found', 'no such job of yours', {}, true);
    }
    if (!holder && req.routeOptions.config.holderOnly) {
      await ctx.audit({ actor: claims.sub, desktopId: c.desktopId, action, outcome: 'denied', detail: `job ${id}: only the holder's laptop may (checkout held by ${c.user})` });
      throw new HttpError(403, 'forbidden', 'only the laptop holding the check-out may do this', {}, true);
    }
    if (holder && action !== 'transfer-pause') {
      const reason = await cutOffReason(ctx, c);
      if (reason) {
        await enforceCutOff(ctx, 'system');
        await ctx.audit({ actor: claims.sub, desktopId: c.desktopId, action, outcome: 'denied', detail: `job ${id}: cut off: ${reason}` });
        throw new HttpError(403, 'cut-off', `no more transfers for this checkout: ${reason}`, {}, true);
      }
    }
    req.jobCaller = { claims, c, id, holder };
  });
  const callerOf = (req: FastifyRequest): JobCaller => {
    if (!req.jobCaller) throw new HttpError(500, 'internal', `${req.method} ${req.routeOptions.url} asks for the job outside the job scope`);
    return req.jobCaller;
  };
  /** Tickets go to the holder only; each one handed out is audited. */
  const answer = async (who: JobCaller, job: Awaited<ReturnType<BrokerContext['scheduler']['get']>>) => {
    if (!job) throw new HttpError(404, 'not-found', 'no such job');
    if (!who.holder) return { ...job, transfer: undefined };
    await auditTicket(ctx, who.claims.sub, who.c.desktopId, job);
    return job;
  };

  app.get('/v1/jobs/:id', { config: { jobAction: 'job-view' } }, async (req) => {
    const who = callerOf(req);
    return await answer(who, await ctx.scheduler.get(who.id));
  });
  // The holder's laptop says how much of the desktop it holds (once a second while filling): the
  // percentage every admin view shows. Not audited (it is only a number for the views).
  app.post('/v1/jobs/:id/progress', { config: { jobAction: 'job-progress', holderOnly: true } }, async (req) => {
    const body = parse(LocalProgress, req.body);
    ctx.jobProgress.reportLocal(callerOf(req).id, body);
    return { ok: true };
  });
  for (const op of ['pause', 'resume'] as const) {
    app.post(`/v1/jobs/:id/${op}`, { config: { jobAction: `transfer-${op}` } }, async (req) => {
      const who = callerOf(req);
      const job = await ctx.scheduler[op](who.id);
      await ctx.audit({ actor: who.claims.sub, desktopId: who.c.desktopId, action: `transfer-${op}`, outcome: 'ok', detail: `job ${who.id}${who.holder ? '' : ` (checkout held by ${who.c.user})`}` });
      return await answer(who, job);
    });
  }
};
