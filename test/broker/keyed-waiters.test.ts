import { test } from 'node:test';
import assert from 'node:assert/strict';
import { KeyedWaiters } from '../../src/broker/keyed-waiters.js';

const settled = async (p: Promise<void>) => {
  let done = false;
  void p.then(() => (done = true));
  await new Promise((r) => setImmediate(r));
  return done;
};

test('wake settles the waits on its key only', async () => {
  const w = new KeyedWaiters();
  const a1 = w.wait('a', 60_000);
  const a2 = w.wait('a', 60_000);
  const b = w.wait('b', 60_000);
  assert.equal(w.size('a'), 2);
  w.wake('a');
  assert.equal(await settled(a1), true);
  assert.equal(await settled(a2), true);
  assert.equal(await settled(b), false);
  assert.equal(w.size(), 1);
  w.wake('b');
  await b;
  assert.equal(w.size(), 0);
});

test('a wait settles after its time and leaves nothing behind', async () => {
  const w = new KeyedWaiters();
  const t0 = Date.now();
  const alive = setTimeout(() => undefined, 5_000); // the wait's own timer is unref'd (it never holds a process open)
  await w.wait('k', 20);
  clearTimeout(alive);
  assert.ok(Date.now() - t0 >= 15);
  assert.equal(w.size(), 0);
  w.wake('k'); // no one waits: nothing happens
});

test('an abort settles the wait and removes its listener; an aborted signal settles at once', async () => {
  const w = new KeyedWaiters();
  const ac = new AbortController();
  let listeners = 0;
  const signal = ac.signal;
  const add = signal.addEventListener.bind(signal);
  const remove = signal.removeEventListener.bind(signal);
  signal.addEventListener = ((...a: Parameters<typeof add>) => ((listeners += 1), add(...a))) as typeof add;
  signal.removeEventListener = ((...a: Parameters<typeof remove>) => ((listeners -= 1), remove(...a))) as typeof remove;
  // Many polls on one long-lived signal (a connection's): each settles by wake and must not leave its listener.
  for (let i = 0; i < 50; i++) {
    const p = w.wait('k', 60_000, signal);
    w.wake('k');
    await p;
  }
  assert.equal(listeners, 0, 'every settled wait took its abort listener away');
  const p = w.wait('k', 60_000, signal);
  ac.abort();
  await p;
  assert.equal(w.size(), 0);
  assert.equal(await settled(w.wait('k', 60_000, signal)), true, 'an already aborted signal settles at once');
  assert.equal(w.size(), 0);
});
