import assert from 'node:assert/strict';
import { existsSync, mkdirSync, mkdtempSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, test } from 'node:test';
import { FsChunkStore } from '../../src/store/fs-chunk-store.js';
import { migrate, openSqlite } from '../../src/store/sqlite.js';

const dir = mkdtempSync(join(tmpdir(), 'carryon-store-'));
after(() => rmSync(dir, { recursive: true, force: true }));
const id = (c: string) => c.repeat(64);

test('fs store: idempotent put, deferred puts visible to has/get but on disk only after sync', async () => {
  const root = join(dir, 's1');
  const s = await FsChunkStore.open(root);
  assert.equal(await s.put(id('a'), Buffer.from('A')), true);
  assert.equal(await s.put(id('a'), Buffer.from('A')), false);
  assert.equal(await s.put(id('b'), Buffer.from('B'), { defer: true }), true);
  assert.equal(await s.has(id('b')), true);
  assert.deepEqual(await s.get(id('b')), Buffer.from('B'));
  assert.equal(existsSync(join(root, 'blobs', 'bb', 'bb', id('b'))), false);
  await s.sync();
  assert.equal(existsSync(join(root, 'blobs', 'bb', 'bb', id('b'))), true);
  assert.deepEqual(await s.missing([id('c'), id('a'), id('c'), id('b'), id('d')]), [id('c'), id('d')]);
  const listed: string[] = [];
  for await (const x of s.list()) listed.push(x);
  assert.deepEqual(listed, [id('a'), id('b')]);
  await s.delete(id('a'));
  assert.equal(await s.get(id('a')), null);
  assert.deepEqual(await s.stats(), { chunks: 1, bytes: 1 });
  await assert.rejects(s.put('../../etc/x', Buffer.from('x')), /not a chunk ID/);
  await assert.rejects(s.getManifest('../x'), /not a manifest digest/);
  await s.putManifest(id('e'), Buffer.from('M'));
  assert.deepEqual(await s.getManifest(id('e')), Buffer.from('M'));
  // Concurrent syncs publish disjoint batches without tripping over each other.
  await Promise.all(['1', '2', '3', '4'].map((c) => s.put(id(c), Buffer.from(c), { defer: true })));
  await Promise.all([s.sync(), s.sync(), s.sync()]);
  assert.deepEqual(await s.missing(['1', '2', '3', '4'].map(id)), []);
  await s.close();
});

test('fs store: leftover temp files from a crash are removed on open', async () => {
  const root = join(dir, 's2');
  mkdirSync(join(root, 'tmp'), { recursive: true });
  writeFileSync(join(root, 'tmp', 'half-written'), 'x');
  await FsChunkStore.open(root);
  assert.deepEqual(readdirSync(join(root, 'tmp')), []);
});

test('sqlite migrations apply once per version, per component', () => {
  const db = openSqlite(join(dir, 'm.db'));
  const a = [{ version: 1, sql: 'CREATE TABLE a (x INTEGER)' }, { version: 2, sql: 'ALTER TABLE a ADD COLUMN y TEXT' }];
  assert.equal(migrate(db, 'alpha', a), 2);
  assert.equal(migrate(db, 'alpha', a), 0);
  assert.equal(migrate(db, 'beta', [{ version: 1, sql: 'CREATE TABLE b (x INTEGER)' }]), 1);
  assert.equal(migrate(db, 'alpha', [...a, { version: 3, sql: 'CREATE TABLE c (x INTEGER)' }]), 1);
  assert.throws(() => migrate(db, 'gamma', [{ version: 1, sql: 'NOT SQL' }]));
  assert.equal((db.prepare("SELECT COUNT(*) AS n FROM schema_migrations WHERE component = 'gamma'").get() as { n: number }).n, 0);
  assert.equal(db.pragma('journal_mode', { simple: true }), 'wal');
  db.close();
});
