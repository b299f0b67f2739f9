import assert from 'node:assert/strict';
import { test } from 'node:test';
import { beginAsked } from '../../src/client/ops/send-changes.js';
import { BrokerError } from '../../src/net/broker-client.js';

test('a background replica begins as one; a broker from before background jobs (400 on the field) gets a plain begin; other refusals stand', async () => {
  const bodies: object[] = [];
  const current = async (body: object) => (bodies.push(body), 'job');
  assert.equal(await beginAsked(current, true), 'job');
  assert.equal(await beginAsked(current, false), 'job');
  assert.deepEqual(bodies, [{ background: true }, {}]);

  const older: object[] = [];
  const old = async (body: object) => {
    older.push(body);
    if ('background' in body) throw new BrokerError(400, 'invalid', 'Unrecognized key: "background"', {});
    return 'job';
  };
  assert.equal(await beginAsked(old, true), 'job');
  assert.deepEqual(older, [{ background: true }, {}]);

  const locked = async () => Promise.reject(new BrokerError(409, 'wrong-state', 'checkout is checked_in', {}));
  await assert.rejects(beginAsked(locked, true), /checked_in/);
  await assert.rejects(beginAsked(async () => Promise.reject(new Error('ECONNRESET')), true), /ECONNRESET/);
});
