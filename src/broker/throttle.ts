/**
 * Failed-login backoff, per user name and per source address. After `free` failures in a row a
 * key is refused for a delay that doubles with each further failure (capped), so guessing
 * costs time even across many addresses (the user key) or many names (the address key).
 * A success clears the user's key. Where the failures are kept is a `FailureLog`: the broker's
 * database (shared by every broker on it, kept across restarts) or memory (tests, tools).
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

/** Where failures are counted. Each method is atomic on its own (several brokers may call at once). */
export interface FailureLog {
  /** The latest time any of `keys` is blocked until (0: none). */
  blockedUntil(keys: readonly string[]): Promise<number>;
  /** Counts one failure of `key` at `at` (the count restarts after `forgetAfterMs` without failures); the new count. */
  recordFailure(key: string, at: number, forgetAfterMs: number): Promise<number>;
  /** Blocks `key` until `until`, never shortening a longer block. */
  block(key: string, until: number): Promise<void>;
  clear(key: string): Promise<void>;
}

/** The delay after `failures` in a row with `free` allowed: 0, then base, 2×base, … up to the cap. */
export function backoffMs(failures: number, free: number, s: ThrottleSettings): number {
  const over = failures - free;
  return over > 0 ? Math.min(s.maxDelayMs, s.baseDelayMs * 2 ** Math.min(30, over - 1)) : 0;
}

export class LoginThrottle {
  constructor(
    private readonly log: FailureLog = new MemoryFailureLog(),
    private readonly s: ThrottleSettings = DEFAULT_THROTTLE,
    private readonly now: () => number = Date.now,
  ) {}

  /** Milliseconds the caller must still wait (0: may try), for the stricter of its two keys. */
  async retryAfterMs(user: string, address: string): Promise<number> {
    return Math.max(0, (await this.log.blockedUntil([`u:${user}`, `a:${address}`])) - this.now());
  }

  async fail(user: string, address: string): Promise<void> {
    await this.bump(`u:${user}`, this.s.freePerUser);
    await this.bump(`a:${address}`, this.s.freePerAddress);
  }

  async succeed(user: string): Promise<void> {
    await this.log.clear(`u:${user}`);
  }

  private async bump(key: string, free: number): Promise<void> {
    const t = this.now();
    const failures = await this.log.recordFailure(key, t, this.s.forgetAfterMs);
    const delay = backoffMs(failures, free, this.s);
    if (delay > 0) await this.log.block(key, t + delay);
  }
}

interface Entry {
  failures: number;
  lastFailure: number;
  blockedUntil: number;
}

/** Failures in this process only (a restart forgets them). */
export class MemoryFailureLog implements FailureLog {
  private readonly keys = new Map<string, Entry>();

  async blockedUntil(keys: readonly string[]): Promise<number> {
    return Math.max(0, ...keys.map((k) => this.keys.get(k)?.blockedUntil ?? 0));
  }

  async recordFailure(key: string, at: number, forgetAfterMs: number): Promise<number> {
    if (this.keys.size > 10_000) this.forget(at, forgetAfterMs);
    const e = this.keys.get(key) ?? { failures: 0, lastFailure: at, blockedUntil: 0 };
    if (at - e.lastFailure > forgetAfterMs) e.failures = 0;
    e.failures++;
    e.lastFailure = at;
    this.keys.set(key, e);
    return e.failures;
  }

  async block(key: string, until: number): Promise<void> {
    const e = this.keys.get(key);
    if (e) e.blockedUntil = Math.max(e.blockedUntil, until);
  }

  async clear(key: string): Promise<void> {
    this.keys.delete(key);
  }

  get size(): number {
    return this.keys.size;
  }

  private forget(t: number, forgetAfterMs: number): void {
    for (const [k, e] of this.keys) if (t - e.lastFailure > forgetAfterMs && e.blockedUntil <= t) this.keys.delete(k);
  }
}

/** The methods of the broker's metadata store that keep failures (both engines). */
export interface FailureTable {
  loginBlockedUntil(keys: readonly string[]): Promise<number>;
  recordLoginFailure(key: string, at: number, forgetAfterMs: number): Promise<number>;
  blockLogin(key: string, until: number): Promise<void>;
  clearLoginFailures(key: string): Promise<void>;
}

/** Failures in the broker's database: every broker on it sees them, a restart keeps them. */
export class DatabaseFailureLog implements FailureLog {
  constructor(private readonly table: FailureTable) {}
  blockedUntil(keys: readonly string[]): Promise<number> {
    return this.table.loginBlockedUntil(keys);
  }
  recordFailure(key: string, at: number, forgetAfterMs: number): Promise<number> {
    return this.table.recordLoginFailure(key, at, forgetAfterMs);
  }
  block(key: string, until: number): Promise<void> {
    return this.table.blockLogin(key, until);
  }
  clear(key: string): Promise<void> {
    return this.table.clearLoginFailures(key);
  }
}
