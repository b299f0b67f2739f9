import { ValidationError } from '../core/errors.js';

/**
 * Token bucket shared by all streams of a transfer, so `--limit-rate` caps the sum (a hotel or
 * tethered link stays usable). Bursts up to a quarter second's worth (a whole second's burst plus
 * what sits in socket buffers put a 10 s window 31% over the cap, measured on the wire); waiting is
 * cut short by abort.
 */
export class RateLimiter {
  private tokens: number;
  private last: number;
  private readonly burst: number;

  constructor(
    readonly bytesPerSecond: number,
    private readonly clock: { now(): number; sleep(ms: number, signal?: AbortSignal): Promise<void> } = realClock,
  ) {
    if (!Number.isFinite(bytesPerSecond) || bytesPerSecond <= 0) throw new ValidationError(`rate limit must be a positive number of bytes per second, not ${bytesPerSecond}`);
    this.burst = bytesPerSecond / 4;
    this.tokens = this.burst;
    this.last = clock.now();
  }

  /** Waits until `bytes` may go (a request larger than the bucket goes once the bucket is full). */
  async take(bytes: number, signal?: AbortSignal): Promise<void> {
    for (;;) {
      const now = this.clock.now();
      this.tokens = Math.min(this.burst, this.tokens + ((now - this.last) / 1000) * this.bytesPerSecond);
      this.last = now;
      const need = Math.min(bytes, this.burst);
      if (this.tokens >= need) {
        this.tokens -= bytes; // may go negative for an oversize request: later callers wait it off
        return;
      }
      if (signal?.aborted) return;
      await this.clock.sleep(Math.ceil(((need - this.tokens) / this.bytesPerSecond) * 1000), signal);
    }
  }
}

/**
 * How a rate-limited download asks for chunks. The limiter waits before reading on, so TCP pushes
 * back on the sender; but what was asked for and not yet read sits in socket buffers and goes over
 * the wire at once. Under a cap, ask for about a quarter second's worth at a time, on as few streams
 * as the rate needs (one per 8 MiB/s).
 */
export function pacing(limit: RateLimiter | undefined, chunkSize: number, streams: number, batch: number): { streams: number; batch: number } {
  if (!limit) return { streams, batch };
  return {
    streams: Math.max(1, Math.min(streams, Math.ceil(limit.bytesPerSecond / (8 * 1024 ** 2)))),
    batch: Math.max(1, Math.min(batch, Math.floor(limit.bytesPerSecond / 4 / chunkSize))),
  };
}

const realClock = {
  now: () => performance.now(),
  sleep: (ms: number, signal?: AbortSignal) =>
    new Promise<void>((resolve) => {
      const t = setTimeout(resolve, ms);
      signal?.addEventListener('abort', () => { clearTimeout(t); resolve(); }, { once: true });
    }),
};

const UNITS: Record<string, number> = { '': 1, k: 1024, m: 1024 ** 2, g: 1024 ** 3 };

/** "800K", "10M", "1.5G" or plain bytes, per second (binary units, as rsync/curl read them). */
export function parseRate(text: string): number {
  const m = /^\s*(\d+(?:\.\d+)?)\s*([kmg]?)(?:i?b)?(?:\/s)?\s*$/i.exec(text);
  if (!m) throw new ValidationError(`rate "${text}" is not understood: use bytes per second, e.g. 500K, 10M, 1G`);
  const value = Number(m[1]) * UNITS[m[2]!.toLowerCase()]!;
  if (value < 1024) throw new ValidationError(`rate "${text}" is below 1K per second`);
  return Math.floor(value);
}

/**
 * The rate a transfer runs at: the user's choice, never above an administrator's bound (policy
 * `maxTransferRateKBps`; 0 or absent is no bound). Undefined: no limit at all.
 */
export function effectiveRate(userBytesPerSecond: number | undefined, boundBytesPerSecond: number | undefined): number | undefined {
  const limits = [userBytesPerSecond, boundBytesPerSecond].filter((r): r is number => r !== undefined && r > 0);
  return limits.length ? Math.min(...limits) : undefined;
}

/** The user's limiter when it is within the bound (kept: one bucket shared by a command's transfers), else one at the bound. */
export function boundedLimiter(user: RateLimiter | undefined, boundBytesPerSecond: number | undefined): RateLimiter | undefined {
  const rate = effectiveRate(user?.bytesPerSecond, boundBytesPerSecond);
  if (rate === undefined) return undefined;
  return user && user.bytesPerSecond === rate ? user : new RateLimiter(rate);
}
