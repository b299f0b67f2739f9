import { decodeManifest, referencedChunks } from '../../core/manifest.js';
import type { BrokerContext } from '../context.js';
import type { JobView } from './types.js';

/** A job as admins see it: who, which desktop, how far, how fast. */
export interface JobDetail extends JobView {
  checkoutId: string;
  desktopId: string;
  desktop: string | null;
  user: string | null;
  deviceId: string | null;
  serverId: string | null;
  queuedAt: string;
  bytesDone: number;
  chunksDone: number;
  /** Chunks the job's manifests reference (a check-out moves at most this many; null for uploads). */
  chunksTotal: number | null;
  /** 0–100 for check-outs; null where the total is not known in advance (check-in, replicate). */
  percent: number | null;
  /** Bytes per second over the last report. */
  rate: number;
}

const totals = new Map<string, number>();

/** Chunks referenced by a manifest (manifests are immutable, so the count is cached by digest). */
async function chunkCount(ctx: BrokerContext, digest: string): Promise<number> {
  let n = totals.get(digest);
  if (n === undefined) {
    const raw = await ctx.store.getManifest(digest);
    n = raw ? referencedChunks(decodeManifest(raw)).size : 0;
    if (totals.size > 10_000) totals.clear();
    totals.set(digest, n);
  }
  return n;
}

/** `GET /v1/admin/transfers`: the scheduler's overview with per-job user, desktop, progress and rate. */
export async function transfersOverview(ctx: BrokerContext) {
  const o = await ctx.scheduler.overview();
  const rows = new Map((await ctx.scheduler.openJobs()).map((r) => [r.id, r]));
  const detail = async (j: JobView): Promise<JobDetail> => {
    const r = rows.get(j.id);
    const co = r ? await ctx.meta.getCheckout(r.checkoutId) : null;
    const desktop = r ? await ctx.meta.getDesktop(r.desktopId) : null;
    const p = ctx.jobProgress.get(j.id);
    const chunksDone = p ? (j.kind === 'checkout' ? p.chunksOut : p.chunksIn) : 0;
    const bytesDone = p ? (j.kind === 'checkout' ? p.bytesOut : p.bytesIn) : 0;
    let chunksTotal: number | null = null;
    if (r && j.kind === 'checkout') {
      const ids = await Promise.all(r.manifests.map((d) => chunkCount(ctx, d)));
      chunksTotal = ids.reduce((a, b) => a + b, 0);
    }
    return {
      ...j, checkoutId: r?.checkoutId ?? '', desktopId: r?.desktopId ?? '', desktop: desktop?.name ?? null, user: co?.user ?? null, deviceId: co?.deviceId ?? null,
      serverId: r?.serverId ?? null, queuedAt: r?.queuedAt ?? '', bytesDone, chunksDone, chunksTotal,
      percent: chunksTotal ? Math.min(100, Math.round((chunksDone / chunksTotal) * 1000) / 10) : chunksTotal === 0 ? 100 : null,
      rate: p?.rate ?? 0,
    };
  };
  return { servers: o.servers, queued: await Promise.all(o.queued.map(detail)), active: await Promise.all(o.active.map(detail)) };
}
