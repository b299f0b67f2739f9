/**
 * Failed-login backoff, per user name and per source address. After `free` failures in a row a
 * key is refused for a delay that doubles with each further failure (capped), so guessing
 * costs time even across many addresses (the user key) or many names (the address key).
 * A success clears the user's key. In memory: a broker restart forgets (documented).
 */
export interface ThrottleSettings {
  /** Failures allowed before any delay, per user. */
  freePerUser: number;
  /** Failures allowed before any delay, per source address (higher: offices share NAT). */
  freePerAddress: number;
  baseDelayMs: number;
  maxDelayMs: number;
  /** A key with no failure for this long is forgotten. */
  forgetAfterMs: number;
}

export const DEFAULT_THROTTLE: ThrottleSettings = { freePerUser: 5, freePerAddress: 20, baseDelayMs: 1000, maxDelayMs: 15 * 60_000, forgetAfterMs: 60 * 60_000 };

interface Entry {
  failures: number;
  lastFailure: number;
  blockedUntil: number;
}

export class LoginThrottle {
  private readonly keys = new Map<string, Entry>();

  constructor(private readonly s: ThrottleSettings = DEFAULT_THROTTLE, private readonly now: () => number = Date.now) {}

  /** Milliseconds the caller must still wait (0: may try), for the stricter of its two keys. */
  retryAfterMs(user: string, address: string): number {
    const t = this.now();
    const wait = (k: string) => Math.max(0, (this.keys.get(k)?.blockedUntil ?? 0) - t);
    return Math.max(wait(`u:${user}`), wait(`a:${address}`));
  }

  fail(user: string, address: string): void {
    this.bump(`u:${user}`, this.s.freePerUser);
    this.bump(`a:${address}`, this.s.freePerAddress);
  }

  succeed(user: string): void {
    this.keys.delete(`u:${user}`);
  }

  get size(): number {
    return this.keys.size;
  }

  private bump(key: string, free: number): void {
    const t = this.now();
    if (this.keys.size > 10_000) this.forget(t);
    const e = this.keys.get(key) ?? { failures: 0, lastFailure: t, blockedUntil: 0 };
    if (t - e.lastFailure > this.s.forgetAfterMs) e.failures = 0;
    e.failures++;
    e.lastFailure = t;
    const over = e.failures - free;
    if (over > 0) e.blockedUntil = t + Math.min(this.s.maxDelayMs, this.s.baseDelayMs * 2 ** Math.min(30, over - 1));
    this.keys.set(key, e);
  }

  private forget(t: number): void {
    for (const [k, e] of this.keys) if (t - e.lastFailure > this.s.forgetAfterMs && e.blockedUntil <= t) this.keys.delete(k);
  }
}
