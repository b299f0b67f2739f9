import assert from 'node:assert/strict';
import { test } from 'node:test';
import { assignJobs, orderQueue } from '../../src/broker/transfers/assign.js';
import { SqliteScheduler } from '../../src/broker/transfers/scheduler.js';
import { generateSigningKey, publicKeyToBase64 } from '../../src/core/signing.js';
import { verifyTicket } from '../../src/core/ticket.js';
import { openSqlite } from '../../src/store/sqlite.js';

const digest = 'c'.repeat(64);

test('assignment: most free slots first, check-ins ahead of check-outs, FIFO within a kind', () => {
  const q = [
    { id: 'o1', kind: 'checkout' as const, seq: 1 },
    { id: 'i1', kind: 'checkin' as const, seq: 2 },
    { id: 'o2', kind: 'checkout' as const, seq: 3 },
    { id: 'r1', kind: 'replicate' as const, seq: 4 },
  ];
  assert.deepEqual(orderQueue(q).map((j) => j.id), ['i1', 'r1', 'o1', 'o2']);
  const a = assignJobs([{ id: 'a', slots: 1, active: 0 }, { id: 'b', slots: 4, active: 1 }], q);
  assert.deepEqual(a, [
    { jobId: 'i1', serverId: 'b' },
    { jobId: 'r1', serverId: 'b' },
    { jobId: 'o1', serverId: 'a' },
    { jobId: 'o2', serverId: 'b' },
  ]);
  assert.deepEqual(assignJobs([{ id: 'a', slots: 1, active: 1 }], q), []);
});

test('scheduler: slots, queue positions, pause grace, ticket expiry, dead servers, survives reopen', () => {
  const key = generateSigningKey();
  let clock = new Date('2026-01-01T00:00:00Z');
  const db = openSqlite(':memory:');
  const s = new SqliteScheduler(db, { signingKey: key.privateKey, now: () => clock, ticketTtlSec: 60, pauseGraceSec: 30, heartbeatSec: 5 });
  s.registerServer({ id: 'ts1', url: 'https://127.0.0.1:1', fingerprint: 'ff', slots: 1 });
  const req = { checkoutId: 'c', desktopId: 'd', manifests: [digest], wrappedKeys: 'AAAA', keyContext: 'lineage:x' };
  const j1 = s.enqueue({ ...req, kind: 'checkout' });
  const j2 = s.enqueue({ ...req, kind: 'checkout' });
  const j3 = s.enqueue({ ...req, kind: 'checkin' });
  assert.equal(j1.state, 'active');
  assert.ok(j1.transfer);
  assert.equal(verifyTicket(j1.transfer.ticket, key.publicKey, { now: clock, serverId: 'ts1' }).direction, 'download');
  assert.equal(s.get(j3.id)!.queuePosition, 1, 'check-in jumps ahead');
  assert.equal(s.get(j2.id)!.queuePosition, 2);

  // Pause holds the slot for the grace time, then the job goes back to the queue.
  assert.equal(s.pause(j1.id)!.state, 'paused');
  assert.equal(s.get(j3.id)!.state, 'queued');
  clock = new Date(clock.getTime() + 31_000);
  s.serverHeartbeat('ts1', { bytesIn: 0, bytesOut: 0 });
  assert.equal(s.get(j3.id)!.state, 'active');
  assert.equal(s.get(j1.id)!.state, 'queued');

  // A ticket not renewed expires and frees the slot.
  clock = new Date(clock.getTime() + 3_000);
  s.serverHeartbeat('ts1', { bytesIn: 0, bytesOut: 0 });
  clock = new Date(clock.getTime() + 4_000);
  s.serverHeartbeat('ts1', { bytesIn: 0, bytesOut: 0 });
  s.finish(j3.id, 'done');
  const next = s.overview().active;
  assert.equal(next.length, 1);
  assert.equal(next[0]!.id, j1.id, 'FIFO among check-outs: the older one first');

  // A silent server leaves the pool; its jobs are queued again.
  clock = new Date(clock.getTime() + 16_000);
  const o = s.overview();
  assert.equal(o.servers[0]!.alive, false);
  assert.equal(o.active.length, 0);
  assert.equal(o.queued.length, 2);

  // Reopen over the same database: state is intact.
  const s2 = new SqliteScheduler(db, { signingKey: key.privateKey, now: () => clock });
  assert.equal(s2.overview().queued.length, 2);
  assert.equal(publicKeyToBase64(key.publicKey).length > 0, true);
});
