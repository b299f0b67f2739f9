import { CarryonError } from '../core/errors.js';
import type { BlockHost } from './storage-daemon.js';

export interface FillProgress {
  done: number;
  total: number;
}

/**
 * Fills a chain's base from its remote backing with QEMU's block-stream job (copy-on-read under
 * the hood): what the guest already read on demand is in the base and is skipped, so each byte
 * travels once. On completion QEMU drops the base's backing: the base is the whole checkpoint.
 * Runs in whichever QEMU holds the chain (the storage daemon, or the VM itself).
 */
export async function streamBase(host: BlockHost, prefix: string, opts: { onProgress?: (p: FillProgress) => void; signal?: AbortSignal; pollMs?: number } = {}): Promise<'complete' | 'stopped'> {
  const jobId = `fill-${prefix}`;
  const isMine = (e: { event: string; data?: Record<string, unknown> }) =>
    (e.event === 'BLOCK_JOB_COMPLETED' || e.event === 'BLOCK_JOB_CANCELLED' || e.event === 'BLOCK_JOB_ERROR') && e.data?.device === jobId;
  await host.qmp.execute('block-stream', { 'job-id': jobId, device: `${prefix}-base`, 'on-error': 'report' });
  const onAbort = () => void host.qmp.execute('block-job-cancel', { device: jobId, force: true }).catch(() => undefined);
  opts.signal?.addEventListener('abort', onAbort, { once: true });
  if (opts.signal?.aborted) onAbort();
  opts.onProgress?.({ done: 0, total: 0 });
  try {
    for (;;) {
      const ev = await host.qmp.waitEvent(isMine, opts.pollMs ?? 250).catch((err: Error) => {
        if (host.qmp.closed) throw new CarryonError('fill-failed', `QEMU went away while filling the disk: ${err.message}`);
        return null;
      });
      if (ev?.event === 'BLOCK_JOB_CANCELLED') return 'stopped';
      if (ev?.event === 'BLOCK_JOB_COMPLETED') {
        const error = ev.data?.error;
        if (typeof error === 'string') throw new CarryonError('fill-failed', `filling the disk stopped: ${error}`);
        return 'complete';
      }
      if (ev?.event === 'BLOCK_JOB_ERROR') continue; // 'report' ends the job; its COMPLETED event follows
      const jobs = (await host.qmp.execute('query-block-jobs')) as { device: string; offset: number; len: number }[];
      const mine = jobs.find((j) => j.device === jobId);
      if (mine) opts.onProgress?.({ done: mine.offset, total: mine.len });
    }
  } finally {
    opts.signal?.removeEventListener('abort', onAbort);
  }
}
