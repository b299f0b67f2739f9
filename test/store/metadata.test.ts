import assert from 'node:assert/strict';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { randomBytes } from 'node:crypto';
import { after, describe, test } from 'node:test';
import { eventHash } from '../../src/broker/db/audit-chain.js';
import { openMetadata, type OpenedMetadata } from '../../src/broker/db/open.js';
import type { SqlConn } from '../../src/sql/driver.js';
import type { MetadataStore } from '../../src/broker/db/metadata.js';
import { checkPostgresUrl, redactDatabaseUrl } from '../../src/sql/pg-driver.js';
import { freshDatabase, testCluster } from '../support/postgres.js';
import { DatabaseFailureLog, LoginThrottle } from '../../src/broker/auth/throttle.js';

/**
 * The metadata store's contract, run by name against each engine: SQLite (the default) and
 * PostgreSQL. "Two instances" are two independent connections to one database, as two brokers
 * (or, for SQLite, two processes) would have.
 */
const dirs: string[] = [];
after(() => {
  for (const d of dirs) rmSync(d, { recursive: true, force: true });
});

/** Two instances: PostgreSQL's are separate pools; SQLite serves one broker, so its two callers share the connection. */
async function two(engine: (typeof engines)[number]): Promise<[OpenedMetadata, OpenedMetadata, () => Promise<void>]> {
  const open = await engine.open();
  const a = await open();
  const b = engine.name === 'SQLite' ? a : await open();
  return [a, b, async () => {
    await a.sql.close();
    if (b !== a) await b.sql.close();
  }];
}

/** One broker master key's chain key, shared by the two instances of a test as brokers share it. */
const AUDIT_KEY = randomBytes(32);

const engines: { name: string; open: () => Promise<() => Promise<OpenedMetadata>> }[] = [
  {
    name: 'SQLite',
    open: async () => {
      const dir = mkdtempSync(join(tmpdir(), 'carryon-meta-'));
      dirs.push(dir);
      return () => openMetadata({ dataDir: dir, auditKey: AUDIT_KEY });
    },
  },
  {
    name: 'PostgreSQL',
    open: async () => {
      const url = await freshDatabase(await testCluster());
      return () => openMetadata({ dataDir: '/nonexistent', database: url, auditKey: AUDIT_KEY });
    },
  },
];

const config = { vcpus: 1, ramMiB: 512, minRamMiB: 256, nic: 'none' as const, usb: false, disks: [] };

async function seed(meta: MetadataStore) {
  await meta.createUser({ name: 'alice', passwordHash: null, role: 'user' });
  await meta.createUser({ name: 'bob', passwordHash: null, role: 'user' });
  const lineage = await meta.createLineage(Buffer.from([0, 1, 2, 255]));
  const desktopId = await meta.createDesktop({ name: 'win', poolId: null, lineageId: lineage, config });
  const snap = await meta.createSnapshot({ desktopId, parentId: null, kind: 'import', disks: [] });
  await meta.setDesktopSnapshot(desktopId, snap);
  const devA = await meta.createDevice({ user: 'alice', name: 'a', publicKey: 'pk', host: {} });
  const devB = await meta.createDevice({ user: 'bob', name: 'b', publicKey: 'pk', host: {} });
  return { lineage, desktopId, snap, devA, devB };
}

for (const engine of engines) {
  describe(`metadata store on ${engine.name}`, () => {
    test('failed logins: counted atomically by two instances, blocks never shortened, forgotten after the quiet period, cleared on success', async () => {
      const [a, b, close] = await two(engine);
      try {
        const throttle = (m: MetadataStore) => new LoginThrottle(new DatabaseFailureLog(m), { freePerUser: 3, freePerAddress: 100, baseDelayMs: 60_000, maxDelayMs: 600_000, forgetAfterMs: 3_600_000 }, () => now);
        let now = 1_000_000;
        const [ta, tb] = [throttle(a.meta), throttle(b.meta)];
        // Eight attempts from two brokers at once: reserved atomically, so only the 3 free ones may be judged.
        const tries = await Promise.all(Array.from({ length: 8 }, (_, i) => (i % 2 ? ta : tb).reserve('mallory', `10.0.0.${i}`)));
        assert.equal(tries.filter((r) => r.ok).length, 3);
        assert.ok(tries.every((r) => r.ok || r.retryAfterMs === 60_000));
        // Counted failures are never lost either: 9 failures, 3 free: 60 s × 2^5, capped at 600 s, seen through either broker.
        await Promise.all(Array.from({ length: 6 }, () => (Math.random() < 0.5 ? a : b).meta.recordLoginFailure('u:mallory', now, 3_600_000)));
        assert.equal(await a.meta.recordLoginFailure('u:mallory', now, 3_600_000), 10);
        await a.meta.blockLogin('u:mallory', now + 600_000);
        assert.equal(await tb.retryAfterMs('mallory', '10.9.9.9'), 600_000);
        await a.meta.blockLogin('u:mallory', now + 1000);
        assert.equal(await ta.retryAfterMs('mallory', '10.9.9.9'), 600_000, 'a shorter block never replaces a longer one');
        await tb.succeed('mallory');
        assert.equal(await ta.retryAfterMs('mallory', '10.9.9.9'), 0);
        // The count starts again after an hour without failures.
        assert.deepEqual(await ta.reserve('trent', '10.1.1.1'), { ok: true });
        now += 3_600_001;
        assert.equal(await b.meta.recordLoginFailure('u:trent', now, 3_600_000), 1);
      } finally {
        await close();
      }
    });

    test('audit chain keyed: an edit with every later hash recomputed is caught; rows without a hash are never chained silently; an older unkeyed chain still verifies', async () => {
      const open = await engine.open();
      let db = await open();
      try {
        for (let i = 1; i <= 5; i++) await db.meta.addEvent({ actor: 'alice', action: 'test', outcome: 'ok', detail: `event ${i}` });
        assert.equal((await db.meta.verifyAuditChain()).ok, true);
        // Someone with write access to the database rewrites event 3 and recomputes every link
        // after it, as they could with plain SHA-256: without the chain key, the links do not verify.
        const rewrite = async (keyed: 1 | null) => {
          await db.sql.run('UPDATE events SET detail = ? WHERE id = 3', ['nothing happened']);
          let prev = String((await db.sql.get('SELECT hash FROM events WHERE id = 2'))!.hash);
          for (const r of await db.sql.all('SELECT * FROM events WHERE id >= 3 ORDER BY id')) {
            const hash = eventHash(prev, { id: Number(r.id), time: String(r.time), actor: String(r.actor), desktopId: (r.desktop_id as string | null) ?? null, action: String(r.action), outcome: String(r.outcome), detail: (r.detail as string | null) ?? null }, null);
            await db.sql.run('UPDATE events SET prev_hash = ?, hash = ?, keyed = ? WHERE id = ?', [prev, hash, keyed, Number(r.id)]);
            prev = hash;
          }
          return db.meta.verifyAuditChain();
        };
        assert.deepEqual(pick(await rewrite(1)), [false, 3, 'event content does not match its hash (it was edited)']);
        assert.deepEqual(pick(await rewrite(null)), [false, 3, 'an unkeyed event after keying began (written without the chain key)']);
        // The hashes taken away instead, for the next open to re-chain: it does not; verify still reports it.
        await db.sql.run('UPDATE events SET prev_hash = NULL, hash = NULL, keyed = NULL WHERE id >= 3');
        await db.sql.close();
        db = await open();
        assert.equal((await db.meta.verifyAuditChain()).ok, false);
        assert.equal((await db.meta.listEvents({ limit: 100 })).filter((e) => e.action === 'audit-chain-repair').length, 0);
      } finally {
        await db.sql.close();
      }

      // A database from before keying (plain SHA-256 links), with the newest rows from before the chain.
      const openOld = await engine.open();
      db = await openOld();
      try {
        await db.sql.run('DELETE FROM events');
        for (let i = 1; i <= 3; i++) await legacyAppend(db.sql, `old ${i}`);
        await db.sql.run('INSERT INTO events (time, actor, action, outcome, detail) VALUES (?, ?, ?, ?, ?)', [new Date().toISOString(), 'bob', 'test', 'ok', 'before the chain']);
        await db.sql.close();
        db = await openOld();
        const check = await db.meta.verifyAuditChain();
        assert.equal(check.ok, true, JSON.stringify(check));
        const said = await db.meta.listEvents({ limit: 100 });
        assert.ok(said.some((e) => e.action === 'audit-chain-repair' && /1 event\(s\)/.test(e.detail ?? '')), 'the re-chaining is itself an event');
        // The unkeyed prefix is covered by the first keyed link: rewriting it, every plain link
        // recomputed and the first keyed event pointed at the new head, is caught there.
        await db.sql.run('UPDATE events SET detail = ? WHERE id = 1', ['nothing']);
        let prev = '0'.repeat(64);
        for (const r of await db.sql.all('SELECT * FROM events WHERE id <= 3 ORDER BY id')) {
          prev = eventHash(prev, { id: Number(r.id), time: String(r.time), actor: String(r.actor), desktopId: null, action: String(r.action), outcome: String(r.outcome), detail: (r.detail as string | null) ?? null }, null);
          await db.sql.run('UPDATE events SET hash = ? WHERE id = ?', [prev, Number(r.id)]);
          await db.sql.run('UPDATE events SET prev_hash = ? WHERE id = ?', [prev, Number(r.id) + 1]);
        }
        assert.deepEqual(pick(await db.meta.verifyAuditChain()), [false, 4, 'event content does not match its hash (it was edited)']);
      } finally {
        await db.sql.close();
      }
    });

    test('rows round-trip: JSON columns, blobs, booleans, creation order', async () => {
      const { meta, sql } = await (await engine.open())();
      try {
        const s = await seed(meta);
        assert.deepEqual(await meta.getLineageKeys(s.lineage), Buffer.from([0, 1, 2, 255]));
        assert.equal((await meta.updateUser('alice', { disabled: true, policy: { usbAllowed: false } })), true);
        const alice = (await meta.getUser('alice'))!;
        assert.deepEqual([alice.disabled, alice.policy], [true, { usbAllowed: false }]);
        assert.deepEqual((await meta.getDesktop('win'))!.config, config);
        const second = await meta.createSnapshot({ desktopId: s.desktopId, parentId: s.snap, kind: 'checkin', disks: [{ name: 'disk0', digest: 'd', sizeBytes: 1, chunkSize: 65536 }] });
        assert.deepEqual((await meta.listSnapshots(s.desktopId)).map((x) => x.id), [s.snap, second]);
        await meta.createGroup('ops');
        await meta.addGroupMember('ops', 'bob');
        await meta.addGroupMember('ops', 'bob'); // idempotent
        assert.deepEqual(await meta.listGroups(), [{ name: 'ops', members: ['bob'] }]);
        await meta.addEntitlement({ principalType: 'group', principal: 'ops', targetType: 'desktop', target: s.desktopId });
        assert.equal(await meta.isEntitled('bob', (await meta.getDesktop('win'))!), true);
        assert.equal(await meta.isEntitled('alice', (await meta.getDesktop('win'))!), false);
        assert.equal(await meta.revokeDevice(s.devA), true);
        assert.equal(await meta.revokeDevice(s.devA), false, 'revoked once');
        assert.ok(await meta.deviceRevokedAt(s.devA));
      } finally {
        await sql.close();
      }
    });

    test('the lock: one active check-out per desktop, compare-and-set transitions', async () => {
      const { meta, sql } = await (await engine.open())();
      try {
        const s = await seed(meta);
        const lease = new Date().toISOString();
        const first = await meta.insertCheckout({ desktopId: s.desktopId, user: 'alice', deviceId: s.devA, checkpointSnapshot: s.snap, leaseExpiresAt: lease });
        assert.ok(first);
        assert.equal(await meta.insertCheckout({ desktopId: s.desktopId, user: 'bob', deviceId: s.devB, checkpointSnapshot: s.snap, leaseExpiresAt: lease }), null);
        assert.equal(await meta.transitionCheckout(first, ['checked_out'], 'checking_in'), false, 'wrong from-state');
        const racing = await Promise.all([1, 2, 3].map(() => meta.transitionCheckout(first, ['transferring'], 'checked_out')));
        assert.equal(racing.filter(Boolean).length, 1, 'one of three racing transitions wins');
        assert.equal(await meta.transitionCheckout(first, ['checked_out'], 'cancelled', { pendingDisks: null }), true);
        assert.ok(await meta.insertCheckout({ desktopId: s.desktopId, user: 'bob', deviceId: s.devB, checkpointSnapshot: s.snap, leaseExpiresAt: lease }), 'unlocked: the next one gets it');
        assert.deepEqual(await meta.deleteSnapshots([s.snap]), [], 'the current snapshot and an active checkpoint are never deleted');
        await meta.setCheckoutCutOff(first, '2026-01-01T00:00:00.000Z');
        assert.equal(await meta.checkoutCutOffAt(first), '2026-01-01T00:00:00.000Z');
      } finally {
        await sql.close();
      }
    });

    test('two instances on one database: racing check-outs, exactly one wins; a lock taken through one is seen by the other', async () => {
      const [a, b, close] = await two(engine);
      try {
        const s = await seed(a.meta);
        const lease = new Date().toISOString();
        const tries = await Promise.all(Array.from({ length: 8 }, (_, i) =>
          (i % 2 ? a : b).meta.insertCheckout({ desktopId: s.desktopId, user: i % 2 ? 'alice' : 'bob', deviceId: i % 2 ? s.devA : s.devB, checkpointSnapshot: s.snap, leaseExpiresAt: lease })));
        const won = tries.filter((t): t is string => t !== null);
        assert.equal(won.length, 1);
        assert.equal((await b.meta.activeCheckout(s.desktopId))?.id, won[0]);
        assert.equal((await a.meta.activeCheckout(s.desktopId))?.id, won[0]);
        // Replay protection is shared too.
        assert.equal(await a.meta.acceptNonce(s.devA, 'n1', 60_000), true);
        assert.equal(await b.meta.acceptNonce(s.devA, 'n1', 60_000), false);
        assert.equal(await b.meta.acceptNonce(s.devB, 'n1', 60_000), true, 'per device');
      } finally {
        await close();
      }
    });

    test('audit chain: concurrent appenders on two instances never fork it', async () => {
      const [a, b, close] = await two(engine);
      try {
        await Promise.all(Array.from({ length: 60 }, (_, i) => (i % 2 ? a : b).meta.addEvent({ actor: `actor${i}`, action: 'test', outcome: 'ok', detail: `Event ${i}` })));
        const check = await b.meta.verifyAuditChain();
        assert.equal(check.ok, true, JSON.stringify(check));
        assert.equal(check.events, 60);
        assert.equal((await a.meta.exportEvents()).trim().split('\n').length, 60);
        assert.equal((await a.meta.listEventsNewest({ text: 'EVENT 1', limit: 100 })).length, 11, 'text search ignores case on both engines (1, 10–19)');
        assert.equal((await a.meta.listEventsNewest({ actor: 'actor7' }))[0]?.detail, 'Event 7');
      } finally {
        await close();
      }
    });

    test('transaction: all or nothing; other callers wait for it', async () => {
      const { meta, sql } = await (await engine.open())();
      try {
        await assert.rejects(meta.transaction(async (tx) => {
          await tx.createPool('p1');
          await tx.setSetting('k', 'v');
          throw new Error('changed my mind');
        }), /changed my mind/);
        assert.equal(await meta.getPool('p1'), null);
        assert.equal(await meta.getSetting('k'), null);
        const order: string[] = [];
        await Promise.all([
          meta.transaction(async (tx) => {
            await tx.setSetting('k', 'in-tx');
            await new Promise((r) => setTimeout(r, 50));
            order.push('tx');
          }),
          (async () => {
            await new Promise((r) => setTimeout(r, 10));
            await meta.setSetting('k', 'after');
            order.push('plain');
          })(),
        ]);
        // SQLite: the plain write waits for the transaction; PostgreSQL: it waits on the row lock.
        assert.deepEqual(order, ['tx', 'plain']);
        assert.equal(await meta.getSetting('k'), 'after');
      } finally {
        await sql.close();
      }
    });
  });
}

test('database URL: checked with a clear error, the password never shown', async () => {
  assert.throws(() => checkPostgresUrl('mysql://u@h/db'), /postgres:\/\//);
  assert.throws(() => checkPostgresUrl('not a url'), /does not parse/);
  assert.throws(() => checkPostgresUrl('postgres://u:s3cret@h'), (e: Error) => /names no database/.test(e.message) && !e.message.includes('s3cret'));
  assert.equal(redactDatabaseUrl('postgres://u:s3cret@h:5432/db'), 'postgres://u:***@h:5432/db');
  await assert.rejects(openMetadata({ dataDir: '/nonexistent', database: 'postgres://carryon:s3cret@127.0.0.1:1/db', auditKey: AUDIT_KEY }),
    (e: Error) => /cannot connect to PostgreSQL at postgres:\/\/carryon:\*\*\*@127\.0\.0\.1:1\/db/.test(e.message) && !e.message.includes('s3cret'));
});

const pick = (c: { ok: boolean; brokenAt?: number; reason?: string }) => [c.ok, c.brokenAt, c.reason];

/** An event as brokers wrote them before the chain was keyed: a plain SHA-256 link. */
async function legacyAppend(sql: SqlConn, detail: string): Promise<void> {
  const last = await sql.get('SELECT hash FROM events ORDER BY id DESC LIMIT 1');
  const prev = last ? String(last.hash) : '0'.repeat(64);
  const time = new Date().toISOString();
  const id = Number((await sql.get('INSERT INTO events (time, actor, action, outcome, detail, prev_hash) VALUES (?, ?, ?, ?, ?, ?) RETURNING id', [time, 'carol', 'test', 'ok', detail, prev]))!.id);
  await sql.run('UPDATE events SET hash = ? WHERE id = ?', [eventHash(prev, { id, time, actor: 'carol', desktopId: null, action: 'test', outcome: 'ok', detail }, null), id]);
}
