import { CarryonError } from '../../core/errors.js';
import { TransferFailed } from '../../transfer-client/client.js';

/** A failure of the link or of the transfer server itself (worth waiting out), not of our data. */
export function isTransient(err: unknown): boolean {
  const code = (err as { code?: string }).code ?? '';
  if (/^(ECONNREFUSED|ECONNRESET|EPIPE|ETIMEDOUT|EHOSTUNREACH|ENETUNREACH|UND_ERR_SOCKET|UND_ERR_CLOSED|UND_ERR_CONNECT_TIMEOUT|UND_ERR_HEADERS_TIMEOUT|UND_ERR_BODY_TIMEOUT)$/.test(code)) return true;
  if (err instanceof TransferFailed) return err.status === undefined ? /stayed busy|terminated|socket/i.test(err.message) : err.status >= 500;
  return /other side closed|socket hang up|terminated/i.test((err as Error)?.message ?? '');
}

/**
 * Runs a resumable transfer step, waiting out a dead link or transfer server with backoff (1 s
 * doubling to 30 s) for up to `budgetMs`, and asking the broker for the job's endpoint again
 * before each retry (it may name another transfer server). Says what happens at every step.
 */
export async function retryTransfer<T>(opts: { what: string; log: (l: string) => void; signal?: AbortSignal; budgetMs?: number; beforeRetry?: () => Promise<void> }, fn: () => Promise<T>): Promise<T> {
  const started = Date.now();
  for (let attempt = 1; ; attempt++) {
    try {
      return await fn();
    } catch (err) {
      if (opts.signal?.aborted || !isTransient(err)) throw err;
      const waited = Date.now() - started;
      if (waited > (opts.budgetMs ?? 300_000)) {
        throw new CarryonError('transfer-unreachable', `${opts.what} could not reach a transfer server for ${Math.round(waited / 1000)} s (${(err as Error).message}); what arrived is kept — run the same command again`);
      }
      const delay = Math.min(30_000, 1000 * 2 ** Math.min(attempt - 1, 5));
      opts.log(`${opts.what}: the transfer server did not answer (${(err as Error).message}); trying again in ${Math.round(delay / 1000)} s`);
      await new Promise<void>((resolve) => {
        const t = setTimeout(resolve, delay);
        opts.signal?.addEventListener('abort', () => { clearTimeout(t); resolve(); }, { once: true });
      });
      if (opts.signal?.aborted) throw err;
      await opts.beforeRetry?.().catch((e: Error) => opts.log(`${opts.what}: asking the broker for the transfer again failed: ${e.message}`));
    }
  }
}
