import assert from 'node:assert/strict';
import { test } from 'node:test';
import { GuestAgentError, GuestAgentUnavailable, type FreezeAgent } from '../../src/live/guest-agent.js';
import { quiesce } from '../../src/live/quiesce.js';

/** A fake agent that records what it was asked and behaves as each test says; bounded like the real one. */
function fakeAgent(behave: { ping?: 'ok' | 'hang'; freeze?: number | 'hang' | 'error' | { slowMs: number }; thaw?: ('ok' | 'hang')[] } = {}) {
  const calls: string[] = [];
  let frozen = false;
  const wait = (ms: number, what: string, done: () => void, hangs: boolean, takesMs = 0): Promise<void> =>
    new Promise((resolve, reject) => {
      if (hangs || takesMs > ms) setTimeout(() => reject(new GuestAgentUnavailable(`guest agent did not answer ${what} within ${ms} ms`)), ms);
      else setTimeout(() => (done(), resolve()), takesMs);
    });
  const thaws = [...(behave.thaw ?? ['ok'])];
  const agent: FreezeAgent = {
    async ping(ms = 5_000) {
      calls.push('ping');
      await wait(ms, 'guest-ping', () => undefined, behave.ping === 'hang');
    },
    async freeze(ms = 5_000) {
      calls.push('freeze');
      const f = behave.freeze ?? 1;
      if (f === 'error') throw new GuestAgentError('guest-fsfreeze-freeze', 'GenericError', 'failed to freeze /mnt: Device or resource busy');
      await wait(ms, 'guest-fsfreeze-freeze', () => (frozen = true), f === 'hang', typeof f === 'object' ? f.slowMs : 0);
      return typeof f === 'number' ? f : 1;
    },
    async thaw(ms = 5_000) {
      calls.push('thaw');
      await wait(ms, 'guest-fsfreeze-thaw', () => (frozen = false), (thaws.shift() ?? 'ok') === 'hang');
      return 1;
    },
    async status() {
      return frozen ? 'frozen' : 'thawed';
    },
  };
  return { agent, calls, isFrozen: () => frozen };
}

const fast = { pingTimeoutMs: 50, freezeTimeoutMs: 100, thawTimeoutMs: 100 };

test('an answering agent: frozen while the point in time is taken, thawed after, quiesced', async () => {
  const f = fakeAgent({ freeze: 2 });
  const r = await quiesce(f.agent, async () => ({ frozenDuring: f.isFrozen() }), fast);
  assert.deepEqual(r.result, { frozenDuring: true });
  assert.equal(r.kind, 'quiesced');
  assert.equal(r.reason, undefined);
  assert.equal(r.thawed, true);
  assert.equal(f.isFrozen(), false);
  assert.deepEqual(f.calls, ['ping', 'freeze', 'thaw']);
  assert.ok(r.frozenMs >= 0 && r.frozenMs < 1_000);
});

test('no agent: the point in time is taken anyway, crash-consistent', async () => {
  const r = await quiesce(null, async () => 42);
  assert.deepEqual([r.result, r.kind, r.reason, r.frozenMs], [42, 'crash-consistent', 'no guest agent', 0]);
});

test('an agent that does not answer a ping: nothing is sent to freeze, crash-consistent, bounded', async () => {
  const f = fakeAgent({ ping: 'hang' });
  const t0 = Date.now();
  const r = await quiesce(f.agent, async () => 'snap', fast);
  assert.ok(Date.now() - t0 < 500);
  assert.equal(r.kind, 'crash-consistent');
  assert.match(r.reason!, /does not answer/);
  assert.deepEqual(f.calls, ['ping'], 'no freeze into a channel nobody reads, so no thaw either');
});

test('a freeze that hangs or is too slow: given up after its bound, the point in time is taken, thawed anyway', async () => {
  for (const freeze of ['hang', { slowMs: 300 }] as const) {
    const f = fakeAgent({ freeze });
    const t0 = Date.now();
    const r = await quiesce(f.agent, async () => 'snap', fast);
    assert.ok(Date.now() - t0 < 600, `bounded: ${Date.now() - t0} ms`);
    assert.equal(r.kind, 'crash-consistent');
    assert.match(r.reason!, /did not freeze/);
    assert.deepEqual(f.calls, ['ping', 'freeze', 'thaw'], 'a freeze that may still happen is thawed');
  }
});

test('a freeze the agent refuses, or one that froze nothing: crash-consistent', async () => {
  const refused = fakeAgent({ freeze: 'error' });
  const r1 = await quiesce(refused.agent, async () => 1, fast);
  assert.equal(r1.kind, 'crash-consistent');
  assert.match(r1.reason!, /Device or resource busy/);
  const none = fakeAgent({ freeze: 0 });
  const r2 = await quiesce(none.agent, async () => 1, fast);
  assert.equal(r2.kind, 'crash-consistent');
  assert.match(r2.reason!, /froze no file system/);
  assert.deepEqual(none.calls, ['ping', 'freeze']);
});

test('the point in time fails: the guest is thawed, then the error comes back', async () => {
  const f = fakeAgent();
  await assert.rejects(quiesce(f.agent, async () => Promise.reject(new Error('transaction failed')), fast), /transaction failed/);
  assert.equal(f.isFrozen(), false);
  assert.deepEqual(f.calls, ['ping', 'freeze', 'thaw']);
});

test('a guest that does not thaw in time: thaw is retried, and the replica is crash-consistent', async () => {
  const problems: string[] = [];
  const once = fakeAgent({ thaw: ['hang', 'ok'] });
  const r = await quiesce(once.agent, async () => 1, { ...fast, onProblem: (m) => problems.push(m) });
  assert.equal(r.kind, 'crash-consistent');
  assert.match(r.reason!, /did not thaw in time/);
  assert.equal(r.thawed, true);
  assert.equal(once.isFrozen(), false);
  assert.deepEqual(once.calls, ['ping', 'freeze', 'thaw', 'thaw']);
  assert.ok(problems.some((p) => /thaw attempt 1 of 3 failed/.test(p)));

  const never = fakeAgent({ thaw: ['hang', 'hang', 'hang'] });
  const t0 = Date.now();
  const r2 = await quiesce(never.agent, async () => 1, fast);
  assert.ok(Date.now() - t0 < 1_000, 'bounded: three attempts of 100 ms');
  assert.deepEqual([r2.kind, r2.thawed], ['crash-consistent', false]);
  assert.match(r2.reason!, /may still be frozen/);
});
