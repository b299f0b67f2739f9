import type { BrokerContext } from '../context.js';
import { jobPercent } from './progress.js';
import type { JobKind, JobView } from './types.js';

/** How far and how fast one job is: the same numbers in every admin view (docs/api.md, "Transfer progress"). */
export interface JobNumbers {
  /** Bytes the transfer server has moved for the job (compressed, sealed blobs; sent for check-outs, received for uploads). */
  bytesDone: number;
  chunksDone: number;
  /** Check-outs: plaintext bytes of the desktop the laptop holds, and of the desktop that are not holes (null until it reports). */
  bytesLocal: number | null;
  bytesTotal: number | null;
  /** Check-outs: of bytesLocal, the plaintext bytes the laptop copied from its own copies of clones (not fetched; null until it reports). */
  bytesCopiedLocally: number | null;
  /** 100 × bytesLocal / bytesTotal, one decimal; null where not known (before the laptop's first report, uploads). */
  percent: number | null;
  /** Bytes per second on the wire over the last few seconds, counted where they arrive (progress.ts). */
  rate: number;
}

/** The one place the broker computes a job's progress. */
export function jobNumbers(ctx: BrokerContext, job: { id: string; kind: JobKind }): JobNumbers {
  const p = ctx.jobProgress.get(job.id);
  const upload = job.kind !== 'checkout';
  return {
    bytesDone: p ? (upload ? p.bytesIn : p.bytesOut) : 0,
    chunksDone: p ? (upload ? p.chunksIn : p.chunksOut) : 0,
    bytesLocal: p?.local?.bytesLocal ?? null,
    bytesTotal: p?.local?.bytesTotal ?? null,
    bytesCopiedLocally: p?.local ? (p.local.bytesCopiedLocally ?? 0) : null,
    percent: jobPercent(p?.local ?? null),
    rate: p?.rate ?? 0,
  };
}

/** A job as admins see it: who, which desktop, how far, how fast. */
export interface JobDetail extends JobView, JobNumbers {
  checkoutId: string;
  desktopId: string;
  desktop: string | null;
  user: string | null;
  deviceId: string | null;
  serverId: string | null;
  queuedAt: string;
}

/** `GET /v1/admin/transfers`: the scheduler's overview with per-job user, desktop, progress and rate. */
export async function transfersOverview(ctx: BrokerContext) {
  const o = await ctx.scheduler.overview();
  const rows = new Map((await ctx.scheduler.openJobs()).map((r) => [r.id, r]));
  const detail = async (j: JobView): Promise<JobDetail> => {
    const r = rows.get(j.id);
    const co = r ? await ctx.meta.getCheckout(r.checkoutId) : null;
    const desktop = r ? await ctx.meta.getDesktop(r.desktopId) : null;
    return {
      ...j, checkoutId: r?.checkoutId ?? '', desktopId: r?.desktopId ?? '', desktop: desktop?.name ?? null, user: co?.user ?? null, deviceId: co?.deviceId ?? null,
      serverId: r?.serverId ?? null, queuedAt: r?.queuedAt ?? '', ...jobNumbers(ctx, j),
    };
  };
  return { servers: o.servers, queued: await Promise.all(o.queued.map(detail)), active: await Promise.all(o.active.map(detail)) };
}

export type CheckoutTransfer = { jobId: string; kind: JobKind; state: string; queuePosition?: number } & JobNumbers;

/**
 * `GET /v1/admin/checkouts`' transfer column: the check-out's open job (its check-out job first),
 * with the numbers `GET /v1/admin/transfers` shows for it.
 */
export async function checkoutTransfers(ctx: BrokerContext): Promise<Map<string, CheckoutTransfer>> {
  const o = await ctx.scheduler.overview();
  const positions = new Map([...o.queued, ...o.active].map((j) => [j.id, j.queuePosition]));
  const out = new Map<string, CheckoutTransfer>();
  for (const r of await ctx.scheduler.openJobs()) {
    const have = out.get(r.checkoutId);
    if (have && (have.kind === 'checkout' || r.kind !== 'checkout')) continue;
    const position = positions.get(r.id);
    out.set(r.checkoutId, { jobId: r.id, kind: r.kind, state: r.state, ...(position !== undefined ? { queuePosition: position } : {}), ...jobNumbers(ctx, r) });
  }
  return out;
}
