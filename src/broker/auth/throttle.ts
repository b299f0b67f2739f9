/**
 * Failed-login backoff, per user name and per source address. After `free` failures in a row a
 * key is refused for a delay that doubles with each further failure (capped), so guessing
 * costs time even across many addresses (the user key) or many names (the address key).
 * An attempt is counted (reserved) before its password is judged, in one atomic step with the
 * check: parallel guesses cannot all pass the check before the first is counted. A success
 * clears the user's key and takes its attempt back from the address's. Where the failures are kept is a `FailureLog`: the broker's
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
  /** Atomically: null if `key` is blocked at `at`, else counts an attempt, blocks for `delays[count - 1]` (last entry beyond), the count. */
  reserve(key: string, at: number, forgetAfterMs: number, delays: readonly number[]): Promise<number | null>;
  /** Takes back one counted attempt. */
  release(key: string): Promise<void>;
}

/** The block each count of attempts sets, from the first to the cap: the `free`-th attempt blocks the next. */
export function delaySchedule(free: number, s: ThrottleSettings): number[] {
  const delays: number[] = [];
  for (let n = 1; n <= free + 32; n++) {
    delays.push(backoffMs(n + 1, free, s));
    if (delays[delays.length - 1]! >= s.maxDelayMs) break;
  }
  return delays;
}

/** The outcome of asking to try a password: judge it, or wait. */
export type Reservation = { ok: true } | { ok: false; retryAfterMs: number };

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

  /**
   * Counts this attempt against both keys before the password is judged, or says how long to wait.
   * A refused attempt is not counted (waiting out a block does not lengthen it).
   */
  async reserve(user: string, address: string): Promise<Reservation> {
    const t = this.now();
    const u = await this.log.reserve(`u:${user}`, t, this.s.forgetAfterMs, delaySchedule(this.s.freePerUser, this.s));
    if (u !== null) {
      const a = await this.log.reserve(`a:${address}`, t, this.s.forgetAfterMs, delaySchedule(this.s.freePerAddress, this.s));
      if (a !== null) return { ok: true };
      await this.log.release(`u:${user}`);
    }
    return { ok: false, retryAfterMs: Math.max(1, await this.retryAfterMs(user, address)) };
  }

  /** A reserved attempt that was never judged (the directory was down): counted against no one. */
  async release(user: string, address: string): Promise<void> {
    await this.log.release(`u:${user}`);
    await this.log.release(`a:${address}`);
  }

  /** A reserved attempt succeeded: the user's failures are forgotten, the address's attempt taken back. */
  async succeed(user: string, address?: string): Promise<void> {
    await this.log.clear(`u:${user}`);
    if (address !== undefined) await this.log.release(`a:${address}`);
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
    return this.recordFailureNow(key, at, forgetAfterMs);
  }

  private recordFailureNow(key: string, at: number, forgetAfterMs: number): number {
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

  async reserve(key: string, at: number, forgetAfterMs: number, delays: readonly number[]): Promise<number | null> {
    // No await between the check and the count: atomic within this process.
    if ((this.keys.get(key)?.blockedUntil ?? 0) > at) return null;
    const n = await this.recordFailureNow(key, at, forgetAfterMs);
    const e = this.keys.get(key)!;
    const delay = delays[Math.min(n, delays.length) - 1] ?? 0;
    if (delay > 0) e.blockedUntil = Math.max(e.blockedUntil, at + delay);
    return n;
  }

  async release(key: string): Promise<void> {
    const e = this.keys.get(key);
    if (e && e.failures > 0) e.failures--;
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
  reserveLoginAttempt(key: string, at: number, forgetAfterMs: number, delays: readonly number[]): Promise<number | null>;
  releaseLoginAttempt(key: string): Promise<void>;
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
  reserve(key: string, at: number, forgetAfterMs: number, delays: readonly number[]): Promise<number | null> {
    return this.table.reserveLoginAttempt(key, at, forgetAfterMs, delays);
  }
  release(key: string): Promise<void> {
    return this.table.releaseLoginAttempt(key);
  }
}
