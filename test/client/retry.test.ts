import assert from 'node:assert/strict';
import { test } from 'node:test';
import { isTransient, retryTransfer } from '../../src/client/session/retry.js';
import { CarryonError } from '../../src/core/errors.js';
import { TransferFailed } from '../../src/transfer-client/client.js';

const refused = () => Object.assign(new Error('connect ECONNREFUSED 127.0.0.1:4433'), { code: 'ECONNREFUSED' });

test('a dead transfer server is waited out with backoff, the endpoint asked for again, and each step said', async () => {
  const logs: string[] = [];
  let calls = 0;
  let renewed = 0;
  const got = await retryTransfer({ what: 'check-out', log: (l) => logs.push(l), beforeRetry: async () => { renewed++; } }, async () => {
    if (++calls < 3) throw refused();
    return 'done';
  });
  assert.equal(got, 'done');
  assert.equal(renewed, 2);
  assert.equal(logs.length, 2);
  assert.match(logs[0]!, /check-out: the transfer server did not answer \(connect ECONNREFUSED.*\); trying again in 1 s/);
});

test('our own failures are not retried; a link that stays dead ends with what to do', async () => {
  let calls = 0;
  await assert.rejects(retryTransfer({ what: 'x', log: () => undefined }, async () => { calls++; throw new CarryonError('bad-blob', 'no'); }), { code: 'bad-blob' });
  assert.equal(calls, 1);
  await assert.rejects(retryTransfer({ what: 'check-in', log: () => undefined, budgetMs: 0 }, async () => { throw refused(); }), (e: unknown) => e instanceof CarryonError && e.code === 'transfer-unreachable' && /run the same command again/.test(e.message));
  assert.equal(isTransient(new TransferFailed('transfer server answered 503', 503)), true);
  assert.equal(isTransient(new TransferFailed('transfer server answered 403', 403)), false);
});
