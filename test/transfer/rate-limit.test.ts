import assert from 'node:assert/strict';
import { test } from 'node:test';
import { ValidationError } from '../../src/core/errors.js';
import { parseRate, RateLimiter } from '../../src/transfer/rate-limit.js';

/** A clock that only moves when the limiter sleeps: the test measures time without waiting. */
function fakeClock() {
  const c = { t: 0, slept: 0, now: () => c.t, sleep: async (ms: number) => { c.t += ms; c.slept += ms; } };
  return c;
}

test('rate limiter: a one-second burst, then the configured rate, shared by all callers', async () => {
  const clock = fakeClock();
  const limit = new RateLimiter(1000, clock);
  await limit.take(1000);
  assert.equal(clock.slept, 0, 'the first second is a burst');
  for (let i = 0; i < 10; i++) await limit.take(500);
  assert.ok(clock.slept >= 4900 && clock.slept <= 5100, `5000 bytes at 1000 B/s took ${clock.slept} ms`);
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

test('parseRate: units, and clear errors for nonsense', () => {
  assert.equal(parseRate('500K'), 500 * 1024);
  assert.equal(parseRate('10M'), 10 * 1024 ** 2);
  assert.equal(parseRate('1.5g'), 1.5 * 1024 ** 3);
  assert.equal(parseRate('2MiB/s'), 2 * 1024 ** 2);
  assert.equal(parseRate('65536'), 65536);
  for (const bad of ['', 'fast', '-1M', '10 T', '100']) assert.throws(() => parseRate(bad), ValidationError, bad);
  assert.throws(() => new RateLimiter(0), ValidationError);
});
