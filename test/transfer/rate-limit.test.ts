import assert from 'node:assert/strict';
import { test } from 'node:test';
import { ValidationError } from '../../src/core/errors.js';
import { boundedLimiter, effectiveRate, pacing, parseRate, RateLimiter } from '../../src/transfer-client/rate-limit.js';
import { backgroundBound, backgroundFrameCharge, policyBound } from '../../src/client/session/transfer-rate.js';
import type { DesktopState } from '../../src/client/vault/vault.js';

/** A clock that only moves when the limiter sleeps: the test measures time without waiting. */
function fakeClock() {
  const c = { t: 0, slept: 0, now: () => c.t, sleep: async (ms: number) => { c.t += ms; c.slept += ms; } };
  return c;
}

test('rate limiter: a quarter-second burst, then the configured rate, shared by all callers', async () => {
  const clock = fakeClock();
  const limit = new RateLimiter(1000, clock);
  await limit.take(250);
  assert.equal(clock.slept, 0, 'the first quarter second is a burst');
  for (let i = 0; i < 10; i++) await limit.take(500);
  // The last 500 bytes go on credit (paid by the next caller): 4750 ms of waiting for 5000 bytes.
  assert.ok(clock.slept >= 4700 && clock.slept <= 5100, `5000 bytes at 1000 B/s took ${clock.slept} ms`);
  // Two streams at once share the budget rather than doubling it.
  const start = clock.slept;
  await Promise.all([0, 1].map(async () => { for (let i = 0; i < 5; i++) await limit.take(200); }));
  assert.ok(clock.slept - start >= 1900, `2000 bytes over two streams took ${clock.slept - start} ms`);
  // One request larger than the bucket still goes, and the debt is paid by the next one.
  const before = clock.slept;
  await limit.take(5000);
  await limit.take(1);
  assert.ok(clock.slept - before >= 4000);
});

test('rate limiter: an aborted wait returns at once', async () => {
  const limit = new RateLimiter(1000);
  await limit.take(1000);
  const abort = new AbortController();
  const t = Date.now();
  const waiting = limit.take(100_000, abort.signal);
  abort.abort();
  await waiting;
  assert.ok(Date.now() - t < 1000);
});

test('pacing: under a cap, a quarter second of chunks per request on as few streams as the rate needs; no cap changes nothing', () => {
  const chunk = 256 * 1024;
  assert.deepEqual(pacing(undefined, chunk, 4, 32), { streams: 4, batch: 32 });
  assert.deepEqual(pacing(new RateLimiter(1024 ** 2), chunk, 4, 32), { streams: 1, batch: 1 });
  assert.deepEqual(pacing(new RateLimiter(10 * 1024 ** 2), chunk, 4, 32), { streams: 2, batch: 10 });
  assert.deepEqual(pacing(new RateLimiter(1024 ** 3), chunk, 4, 32), { streams: 4, batch: 32 });
  assert.deepEqual(pacing(new RateLimiter(64 * 1024), 4 * 1024 ** 2, 4, 32), { streams: 1, batch: 1 }, 'at least one chunk');
});

test('parseRate: units, and clear errors for nonsense', () => {
  assert.equal(parseRate('500K'), 500 * 1024);
  assert.equal(parseRate('10M'), 10 * 1024 ** 2);
  assert.equal(parseRate('1.5g'), 1.5 * 1024 ** 3);
  assert.equal(parseRate('2MiB/s'), 2 * 1024 ** 2);
  assert.equal(parseRate('65536'), 65536);
  for (const bad of ['', 'fast', '-1M', '10 T', '100']) assert.throws(() => parseRate(bad), ValidationError, bad);
  assert.throws(() => new RateLimiter(0), ValidationError);
});

test('limit composition: the user may go below the policy bound, never above it; 0 or absent is no bound', () => {
  assert.equal(effectiveRate(undefined, undefined), undefined);
  assert.equal(effectiveRate(1_000_000, undefined), 1_000_000);
  assert.equal(effectiveRate(undefined, 256 * 1024), 256 * 1024, 'no --limit-rate still runs under the bound');
  assert.equal(effectiveRate(10_000_000, 256 * 1024), 256 * 1024, 'a user cannot raise the bound');
  assert.equal(effectiveRate(100_000, 256 * 1024), 100_000, 'a user may go lower');
  assert.equal(effectiveRate(100_000, 0), 100_000);
  const user = new RateLimiter(100_000);
  assert.equal(boundedLimiter(user, 256 * 1024), user, 'within the bound: the command\'s own (shared) bucket');
  assert.equal(boundedLimiter(new RateLimiter(10_000_000), 256 * 1024)!.bytesPerSecond, 256 * 1024);
  assert.equal(boundedLimiter(undefined, 256 * 1024)!.bytesPerSecond, 256 * 1024);
  assert.equal(boundedLimiter(undefined, undefined), undefined);
  const state = (config: Record<string, unknown>) => ({ config }) as unknown as DesktopState;
  assert.equal(policyBound(state({ maxTransferRateKBps: 256 })), 256 * 1024);
  assert.equal(policyBound(state({ maxTransferRateKBps: 0 })), undefined);
  assert.equal(policyBound(state({})), undefined, 'a check-out from before the policy existed: no bound');

  // A background replica: the policy's background rate (default 8 MiB/s), as the broker says it now, within the bound.
  assert.equal(backgroundBound(state({})), 8 * 1024 * 1024, 'a check-out from before the key: the default');
  assert.equal(backgroundBound(state({ replicationRateKBps: 512 })), 512 * 1024);
  assert.equal(backgroundBound(state({ replicationRateKBps: 512 }), 128), 128 * 1024, 'the broker\'s value now wins over the recorded one');
  assert.equal(backgroundBound(state({ replicationRateKBps: 512 }), 'fast'), 512 * 1024, 'a malformed answer: the recorded value');
  assert.equal(backgroundBound(state({ replicationRateKBps: 0 })), undefined, '0: bound only by maxTransferRateKBps');
  assert.equal(backgroundBound(state({ replicationRateKBps: 0, maxTransferRateKBps: 256 })), 256 * 1024);
  assert.equal(backgroundBound(state({ replicationRateKBps: 4096, maxTransferRateKBps: 256 }), 8192), 256 * 1024, 'never above maxTransferRateKBps');
  // Each of its frames counts at least a quarter of the largest disk's chunk.
  assert.equal(backgroundFrameCharge([256 * 1024]), 64 * 1024);
  assert.equal(backgroundFrameCharge([64 * 1024, 1024 * 1024]), 256 * 1024);
  assert.equal(backgroundFrameCharge([]), 0);
});
