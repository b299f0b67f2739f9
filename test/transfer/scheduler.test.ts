import assert from 'node:assert/strict';
import { test } from 'node:test';
import { assignJobs, orderQueue } from '../../src/broker/transfers/assign.js';
import { Scheduler } from '../../src/broker/transfers/scheduler.js';
import { SchedulerStore } from '../../src/broker/transfers/scheduler-store.js';
import { generateSigningKey, publicKeyToBase64 } from '../../src/core/signing.js';
import { verifyTicket } from '../../src/core/tokens/ticket.js';
import type { SqlDb } from '../../src/sql/driver.js';
import { PgSql } from '../../src/sql/pg-driver.js';
import { SqliteSql } from '../../src/sql/sqlite-driver.js';
import { freshDatabase, testCluster } from '../support/postgres.js';

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
  // The agent's scheduled replica waits behind every job a user waits for.
  assert.deepEqual(orderQueue([{ id: 'b1', kind: 'replicate' as const, seq: 0, background: true }, ...q]).map((j) => j.id), ['i1', 'r1', 'o1', 'o2', 'b1']);
});

async function slotsAndQueue(open: () => Promise<SqlDb>): Promise<void> {
  const key = generateSigningKey();
  let clock = new Date('2026-01-01T00:00:00Z');
  const db = await open();
  const s = new Scheduler(await SchedulerStore.open(db), { signingKey: key.privateKey, now: () => clock, ticketTtlSec: 60, pauseGraceSec: 30, heartbeatSec: 5 });
  await s.registerServer({ id: 'ts1', url: 'https://127.0.0.1:1', fingerprint: 'ff', slots: 1 });
  const req = { checkoutId: 'c', desktopId: 'd', manifests: [digest], wrappedKeys: 'AAAA', keyContext: 'lineage:x' };
  const j1 = await s.enqueue({ ...req, kind: 'checkout' });
  const j2 = await s.enqueue({ ...req, kind: 'checkout' });
  const j3 = await s.enqueue({ ...req, kind: 'checkin' });
  assert.equal(j1.state, 'active');
  assert.ok(j1.transfer);
  assert.equal(verifyTicket(j1.transfer.ticket, key.publicKey, { now: clock, serverId: 'ts1' }).direction, 'download');
  assert.equal((await s.get(j3.id))!.queuePosition, 1, 'check-in jumps ahead');
  assert.equal((await s.get(j2.id))!.queuePosition, 2);

  // Pause holds the slot for the grace time, then the job goes back to the queue.
  assert.equal((await s.pause(j1.id))!.state, 'paused');
  assert.equal((await s.get(j3.id))!.state, 'queued');
  clock = new Date(clock.getTime() + 31_000);
  await s.serverHeartbeat('ts1', { bytesIn: 0, bytesOut: 0 });
  assert.equal((await s.get(j3.id))!.state, 'active');
  assert.equal((await s.get(j1.id))!.state, 'queued');

  // A ticket not renewed expires and frees the slot.
  clock = new Date(clock.getTime() + 3_000);
  await s.serverHeartbeat('ts1', { bytesIn: 0, bytesOut: 0 });
  clock = new Date(clock.getTime() + 4_000);
  await s.serverHeartbeat('ts1', { bytesIn: 0, bytesOut: 0 });
  await s.finish(j3.id, 'done');
  const next = (await s.overview()).active;
  assert.equal(next.length, 1);
  assert.equal(next[0]!.id, j1.id, 'FIFO among check-outs: the older one first');

  // A silent server leaves the pool; its jobs are queued again.
  clock = new Date(clock.getTime() + 16_000);
  const o = await s.overview();
  assert.equal(o.servers[0]!.alive, false);
  assert.equal(o.active.length, 0);
  assert.equal(o.queued.length, 2);

  // Reopen over the same database: state is intact.
  const s2 = new Scheduler(await SchedulerStore.open(db), { signingKey: key.privateKey, now: () => clock });
  assert.equal((await s2.overview()).queued.length, 2);
  assert.equal(publicKeyToBase64(key.publicKey).length > 0, true);

  // A background replica (the agent's) queues behind users' jobs; its ticket, and only its, says so
  // (the transfer server then rebuilds its chunks in the idle CPU class).
  await s2.registerServer({ id: 'ts2', url: 'https://127.0.0.1:2', fingerprint: 'ee', slots: 1 });
  const now = await s2.overview();
  assert.deepEqual([now.active.length, now.queued.length], [1, 1], 'one check-out runs on the new server, one waits');
  const [first, second] = [now.active[0]!, now.queued[0]!];
  const bg = await s2.enqueue({ ...req, kind: 'replicate', background: true });
  const fg = await s2.enqueue({ ...req, kind: 'replicate' });
  assert.deepEqual([(await s2.get(fg.id))!.queuePosition, (await s2.get(second.id))!.queuePosition, (await s2.get(bg.id))!.queuePosition], [1, 2, 3]);
  await s2.finish(first.id, 'done');
  const fgTicket = (await s2.get(fg.id))!.transfer!.ticket;
  assert.equal(verifyTicket(fgTicket, key.publicKey, { now: clock, serverId: 'ts2' }).background, undefined);
  await s2.finish(fg.id, 'done');
  await s2.finish(second.id, 'done');
  const bgView = (await s2.get(bg.id))!;
  assert.equal(bgView.state, 'active');
  assert.equal(verifyTicket(bgView.transfer!.ticket, key.publicKey, { now: clock, serverId: 'ts2' }).background, true);
  await db.close();
}

test('scheduler on SQLite: slots, queue positions, pause grace, ticket expiry, dead servers, survives reopen', () => slotsAndQueue(async () => SqliteSql.open(':memory:')));
test('scheduler on PostgreSQL: the same', async () => slotsAndQueue(async () => PgSql.open(await freshDatabase(await testCluster()))));

test('scheduler on PostgreSQL: two brokers racing for one slot hand it out once', async () => {
  const key = generateSigningKey();
  const url = await freshDatabase(await testCluster());
  const [da, db] = [await PgSql.open(url), await PgSql.open(url)];
  try {
    const [a, b] = [new Scheduler(await SchedulerStore.open(da), { signingKey: key.privateKey }), new Scheduler(await SchedulerStore.open(db), { signingKey: key.privateKey })];
    await a.registerServer({ id: 'ts1', url: 'https://127.0.0.1:1', fingerprint: 'ff', slots: 2 });
    const req = { checkoutId: 'c', desktopId: 'd', manifests: [digest], wrappedKeys: 'AAAA', keyContext: 'lineage:x', kind: 'checkout' as const };
    const jobs = await Promise.all(Array.from({ length: 12 }, (_, i) => (i % 2 ? a : b).enqueue(req)));
    assert.equal(jobs.length, 12);
    const [oa, ob] = [await a.overview(), await b.overview()];
    assert.equal(oa.active.length, 2, 'two slots, two active jobs, whichever broker enqueued them');
    assert.equal(oa.servers[0]!.inUse, 2);
    assert.deepEqual(ob.queued.map((j) => j.queuePosition), Array.from({ length: 10 }, (_, i) => i + 1), 'one queue, seen alike from both brokers');
    // A slot freed through one broker is filled at once, as seen through the other.
    await b.finish(oa.active[0]!.id, 'done');
    assert.equal((await a.overview()).active.length, 2);
    assert.ok((await a.revokedJobIds()).includes(oa.active[0]!.id), 'the ended job is revoked through both');
  } finally {
    await da.close();
    await db.close();
  }
});

async function gatewayRoutes(open: () => Promise<SqlDb>): Promise<void> {
  const key = generateSigningKey();
  const db = await open();
  const gateway = { host: 'gw.example.com', port: 443, domain: 'gw.example.com' };
  const s = new Scheduler(await SchedulerStore.open(db), { signingKey: key.privateKey, gateway: () => gateway });
  await s.registerServer({ id: 'ts1', url: 'https://10.0.0.3:9443', fingerprint: 'f'.repeat(64), slots: 2 });
  const req = { kind: 'checkout' as const, checkoutId: 'c', desktopId: 'd', manifests: [digest], wrappedKeys: 'AAAA', keyContext: 'lineage:x' };
  const laptop = await s.enqueue(req);
  assert.equal(laptop.transfer?.url, 'https://gw.example.com:443');
  assert.equal(laptop.transfer?.servername, 'ts1.transfer.gw.example.com');
  assert.equal(laptop.transfer?.fingerprint, 'f'.repeat(64));
  const host = await s.enqueue(req, 'internal');
  assert.equal(host.transfer?.url, 'https://10.0.0.3:9443');
  assert.equal(host.transfer?.servername, undefined);
  assert.equal((await s.get(host.id, 'internal'))!.transfer?.url, 'https://10.0.0.3:9443');
  assert.equal((await s.get(host.id))!.transfer?.url, 'https://gw.example.com:443');
  // Without a gateway nothing changes on the wire.
  const plain = new Scheduler(new SchedulerStore(db), { signingKey: key.privateKey });
  assert.deepEqual(Object.keys((await plain.get(laptop.id))!.transfer!).sort(), ['fingerprint', 'maxStreams', 'ticket', 'ticketExpiresAt', 'url']);
  assert.equal(await s.gatewayConfig(), null);
  await s.gatewayConfigMade('a'.repeat(64));
  assert.equal((await plain.gatewayConfig())?.hash, 'a'.repeat(64));
  await s.gatewayConfigMade('b'.repeat(64));
  assert.equal((await plain.gatewayConfig())?.hash, 'b'.repeat(64), 'one record, replaced');
  await db.close();
}
test('with a gateway, laptops get its address and the server\'s SNI name (pin unchanged); desktop hosts still get the server\'s own URL; the config record (SQLite)', () => gatewayRoutes(async () => SqliteSql.open(':memory:')));
test('the same on PostgreSQL', async () => gatewayRoutes(async () => PgSql.open(await freshDatabase(await testCluster()))));
