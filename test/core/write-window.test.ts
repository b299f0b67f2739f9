import assert from 'node:assert/strict';
import { test } from 'node:test';
import { WriteWindow } from '../../src/core/write-window.js';

const later = (ms: number, fail?: Error) => new Promise<void>((resolve, reject) => setTimeout(() => (fail ? reject(fail) : resolve()), ms));

test('a write window keeps at most its size in flight and drains', async () => {
  const w = new WriteWindow(2);
  let running = 0;
  let most = 0;
  const job = async () => {
    running++;
    most = Math.max(most, running);
    await later(5);
    running--;
  };
  for (let i = 0; i < 6; i++) await w.add(job());
  await w.drain();
  assert.equal(running, 0);
  assert.ok(most <= 2, `at most 2 in flight, saw ${most}`);
});

test('the first failure is thrown by the next add or drain; writes added after it are still observed', async () => {
  const unhandled: unknown[] = [];
  const onUnhandled = (e: unknown) => unhandled.push(e);
  process.on('unhandledRejection', onUnhandled);
  try {
    const w = new WriteWindow(4);
    await w.add(later(1, new Error('ENOSPC')));
    await later(5);
    // Handed over after the failure: must be tracked even though add throws.
    await assert.rejects(w.add(later(1, new Error('second'))), /ENOSPC/);
    await assert.rejects(w.drain(), /ENOSPC/);
    await later(20);
    assert.deepEqual(unhandled, []);
  } finally {
    process.off('unhandledRejection', onUnhandled);
  }
});
