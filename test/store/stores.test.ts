import assert from 'node:assert/strict';
import { existsSync, mkdirSync, mkdtempSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { FsChunkStore } from '../../src/store/fs-chunk-store.js';
import { openChunkStore } from '../../src/store/open-store.js';
import { PackChunkStore } from '../../src/store/pack-chunk-store.js';
import type { ChunkStore } from '../../src/store/chunk-store.js';
import { migrate, openSqlite } from '../../src/sql/sqlite.js';
import { openSwiftStore, startSwift, type SwiftServer } from '../support/swift.js';
import { withTmpfs } from '../support/tmpfs.js';
import { PgPackIndex } from '../../src/store/pg-pack-index.js';
import { SqlitePackIndex, type PackIndex } from '../../src/store/pack-index.js';
import { dyingIndex } from '../support/dying-index.js';
import { PackRepository } from '../../src/store/pack-repository.js';
import { DirBackend } from '../../src/store/backend/dir-backend.js';
import { PgSql } from '../../src/sql/pg-driver.js';
import { freshDatabase, testCluster } from '../support/postgres.js';

const dir = mkdtempSync(join(tmpdir(), 'carryon-store-'));
after(() => rmSync(dir, { recursive: true, force: true }));
const id = (c: string) => c.repeat(64);

test('fs store: a deferred blob is a file in blobs/ only after sync', async () => {
  const root = join(dir, 's1');
  const s = await FsChunkStore.open(root);
  assert.equal(await s.put(id('b'), Buffer.from('B'), { defer: true }), true);
  assert.deepEqual(await s.get(id('b')), Buffer.from('B'));
  assert.equal(existsSync(join(root, 'blobs', 'bb', 'bb', id('b'))), false);
  await s.sync();
  assert.equal(existsSync(join(root, 'blobs', 'bb', 'bb', id('b'))), true);
  await s.close();
});

test('fs store: a sync while another caller\'s deferred put is still writing waits for it, then publishes it whole; a read waits too', async () => {
  const root = join(dir, 's-race');
  const s = await FsChunkStore.open(root);
  const big = Buffer.alloc(16 * 1024 * 1024, 7);
  // Not awaited: another push session's put, its file still being written when this one syncs.
  const putting = s.put(id('c'), big, { defer: true });
  while (!(await s.has(id('c')))) await new Promise((r) => setImmediate(r));
  const reading = s.get(id('c'));
  await s.sync();
  assert.equal(await putting, true);
  assert.ok((await reading)?.equals(big));
  assert.ok(existsSync(join(root, 'blobs', 'cc', 'cc', id('c'))));
  assert.ok((await s.get(id('c')))?.equals(big));
});

test('fs store: leftover temp files from a crash are removed on open', async () => {
  const root = join(dir, 's2');
  mkdirSync(join(root, 'tmp'), { recursive: true });
  writeFileSync(join(root, 'tmp', 'half-written'), 'x');
  await FsChunkStore.open(root);
  assert.deepEqual(readdirSync(join(root, 'tmp')), []);
});

async function commonContract(s: ChunkStore): Promise<void> {
  assert.equal(await s.put(id('a'), Buffer.from('A')), true);
  assert.equal(await s.put(id('a'), Buffer.from('A')), false);
  assert.equal(await s.put(id('b'), Buffer.from('BB'), { defer: true }), true);
  assert.equal(await s.has(id('b')), true);
  assert.deepEqual(await s.get(id('b')), Buffer.from('BB'));
  await s.sync();
  assert.deepEqual(await s.missing([id('c'), id('a'), id('c'), id('b'), id('d')]), [id('c'), id('d')]);
  const listed: string[] = [];
  for await (const x of s.list()) listed.push(x);
  assert.deepEqual(listed.sort(), [id('a'), id('b')]);
  await s.delete(id('a'));
  assert.equal(await s.get(id('a')), null);
  assert.deepEqual(await s.stats(), { chunks: 1, bytes: 2 });
  await assert.rejects(s.put('../../etc/x', Buffer.from('x')), /not a chunk ID/);
  await assert.rejects(s.getManifest('../x'), /not a manifest digest/);
  await s.putManifest(id('e'), Buffer.from('M'));
  assert.deepEqual(await s.getManifest(id('e')), Buffer.from('M'));
  await Promise.all(['1', '2', '3', '4'].map((c) => s.put(id(c), Buffer.from(c.repeat(1000)), { defer: true })));
  await Promise.all([s.sync(), s.sync(), s.sync()]);
  assert.deepEqual(await s.missing(['1', '2', '3', '4'].map(id)), []);
  assert.deepEqual(await s.get(id('3')), Buffer.from('3'.repeat(1000)));
}

let swift: SwiftServer;
before(async () => {
  swift = await startSwift();
});
after(() => swift?.stop());

test('every store keeps the same contract: file per blob, packs, S3 (real Swift + s3api; SQLite or PostgreSQL pack index)', async () => {
  const opens: [string, (root: string) => Promise<ChunkStore>][] = [
    ['fs', FsChunkStore.open],
    ['pack', (root) => PackChunkStore.open(root)],
    ['s3', (root) => openSwiftStore(swift, root, 'contract')],
    ['s3-pg', async (root) => openSwiftStore(swift, root, 'contractpg', '', { index: await PgPackIndex.open(await freshDatabase(await testCluster())) })],
  ];
  for (const [name, open] of opens) {
    const s = await open(join(dir, `contract-${name}`));
    await commonContract(s);
    await s.close();
  }
});

test('pack store: unsynced puts vanish on a crash, synced ones survive; leftovers are only wasted space', async () => {
  const root = join(dir, 'pack-crash');
  const s = await PackChunkStore.open(root);
  await s.put(id('a'), Buffer.from('durable'), { defer: true });
  await s.sync();
  await s.put(id('b'), Buffer.from('never synced'), { defer: true });
  // "Crash": a second opener (another process, or the next start) sees only the synced blob.
  const after = await PackChunkStore.open(root);
  assert.deepEqual(await after.get(id('a')), Buffer.from('durable'));
  assert.equal(await after.get(id('b')), null);
  const usage = await after.packUsage();
  assert.ok(usage.packBytes > usage.liveBytes, 'the unsynced record is dead bytes in the pack');
  await after.close();
  await s.close();
});

test('pack store: two writers on one store (checkout + serve) each append to their own pack', async () => {
  const root = join(dir, 'pack-two');
  const [a, b] = [await PackChunkStore.open(root), await PackChunkStore.open(root)];
  await Promise.all([
    ...['1', '2', '3'].map((c) => a.put(id(c), Buffer.from(`a${c}`), { defer: true })),
    ...['3', '4', '5'].map((c) => b.put(id(c), Buffer.from(`b${c}`), { defer: true })),
  ]);
  await Promise.all([a.sync(), b.sync()]);
  for (const s of [a, b]) {
    assert.deepEqual(await s.missing(['1', '2', '3', '4', '5'].map(id)), []);
    assert.deepEqual(await s.get(id('4')), Buffer.from('b4'));
    assert.match((await s.get(id('3')))!.toString(), /^[ab]3$/, 'the first writer to commit wins; both copies are whole');
  }
  assert.equal((await a.packUsage()).packs, 2);
  await a.close();
  await b.close();
});

test('pack store: a pack that does not hold what the index says is a clear error, not data', async () => {
  const root = join(dir, 'pack-corrupt');
  const s = await PackChunkStore.open(root);
  await s.put(id('a'), Buffer.from('x'.repeat(100)));
  await s.close();
  const [pack] = readdirSync(join(root, 'packs'));
  writeFileSync(join(root, 'packs', pack!), Buffer.alloc(50));
  const again = await PackChunkStore.open(root);
  await assert.rejects(again.get(id('a')), /does not hold chunk/);
  await again.close();
});

test('openChunkStore: an existing file-per-blob store stays one; new stores are packs', async () => {
  const old = join(dir, 'legacy');
  const fsStore = await FsChunkStore.open(old);
  await fsStore.put(id('a'), Buffer.from('A'));
  await fsStore.close();
  const reopened = await openChunkStore(old);
  assert.ok(reopened instanceof FsChunkStore);
  assert.deepEqual(await reopened.get(id('a')), Buffer.from('A'));
  await reopened.close();
  const fresh = await openChunkStore(join(dir, 'fresh'));
  assert.ok(fresh instanceof PackChunkStore);
  await fresh.close();
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

test('postgres migrations apply once per version, per component, also when several processes start at once', async () => {
  const url = await freshDatabase(await testCluster());
  const dbs = await Promise.all([1, 2, 3].map(() => PgSql.open(url)));
  try {
    const a = [{ version: 1, sql: 'CREATE TABLE a (x INTEGER)' }, { version: 2, sql: 'ALTER TABLE a ADD COLUMN y TEXT' }];
    assert.deepEqual((await Promise.all(dbs.map((d) => d.migrate('alpha', a)))).sort(), [0, 0, 2], 'one process migrates, the others find it done');
    assert.equal(await dbs[0]!.migrate('beta', [{ version: 1, sql: 'CREATE TABLE b (x INTEGER)' }]), 1);
    await assert.rejects(dbs[1]!.migrate('gamma', [{ version: 1, sql: 'NOT SQL' }]));
    assert.equal((await dbs[2]!.get<{ n: number }>("SELECT COUNT(*) AS n FROM schema_migrations WHERE component = 'gamma'"))!.n, 0);
  } finally {
    for (const d of dbs) await d.close();
  }
});

test('pack store: a write that fails (disk full) is reported by its put and never poisons later syncs', async (t) => {
  const mnt = join(dir, 'tiny');
  await withTmpfs(t, mnt, '2m', async () => {
    const s = await PackChunkStore.open(join(mnt, 'store'));
    const filler = join(mnt, 'filler');
    writeFileSync(filler, Buffer.alloc(512 * 1024));
    const blob = Buffer.alloc(256 * 1024, 7);
    const results = await Promise.allSettled(Array.from({ length: 12 }, (_, i) => s.put(id('f').slice(0, 62) + i.toString().padStart(2, '0'), blob, { defer: true })));
    const stored = results.filter((r) => r.status === 'fulfilled').length;
    assert.ok(results.some((r) => r.status === 'rejected' && /ENOSPC/.test(String((r as PromiseRejectedResult).reason))), 'the disk filled up');
    await s.sync().catch(() => undefined); // may fail while the disk is full (the index cannot grow)
    rmSync(filler);
    await s.sync(); // publishes what was written whole; the failed puts were already reported
    assert.equal((await s.stats()).chunks, stored);
    await s.close();
  });
});

test('pack store: GC never drops or compacts a pack still holding blobs this process has not published', async () => {
  const s = await PackChunkStore.open(join(dir, 'pack-gc-pending'), { touchSlackMs: 0 });
  await s.put(id('1'), Buffer.from('x'.repeat(1000)), { defer: true });
  await s.sealPacks(); // GC seals first; the unpublished put still sits in that pack
  const [pack] = await s.packs();
  assert.equal(pack!.liveBytes, 0, 'nothing in it is published yet');
  assert.equal(pack!.active, true);
  assert.equal(await s.dropPack(pack!), 0);
  assert.deepEqual(await s.compactPack(pack!), { moved: 0, freedBytes: 0 });
  await s.sync();
  assert.deepEqual(await s.get(id('1')), Buffer.from('x'.repeat(1000)));
  // Published and sealed: now it can go once nothing lives in it.
  await s.sweep([id('1')], Date.now() + 1);
  const [after] = await s.packs();
  assert.equal(after!.active, false);
  assert.equal(await s.dropPack(after!), after!.bytes);
  assert.deepEqual(await s.packs(), []);
  await s.close();
});

test('pack and S3 stores: a crash between the pack write and the index commit leaves nothing referenced that does not exist', async () => {
  for (const name of ['pack', 's3'] as const) {
    const root = join(dir, `crash-commit-${name}`);
    const base = SqlitePackIndex.open(join(root, 'index.sqlite'));
    const failing = { insert: false };
    const dying = dyingIndex(base, failing);
    const open = async (index: PackIndex) => name === 'pack' ? new PackRepository(await DirBackend.open(root), index, { packBytes: 1024 ** 3 }) : openSwiftStore(swift, root, 'crashcommit', '', { index });
    const crashed = await open(dying);
    await crashed.put(id('a'), Buffer.from('published'));
    failing.insert = true;
    await crashed.put(id('b'), Buffer.from('written, never published'), { defer: true });
    await assert.rejects(crashed.sync(), /killed before the index commit/);
    // What another process (or the next start) finds: every row names bytes that are there.
    const after = await open(base);
    for await (const row of base.list()) assert.equal((await after.get(row.id))?.length, row.length, `${name}: ${row.id} in ${row.pack}`);
    assert.equal(await after.get(id('b')), null);
    const usage = await after.packUsage();
    assert.ok(usage.packBytes > usage.liveBytes, `${name}: the unpublished record is dead bytes`);
    await after.sweep([id('a')], Date.now() + 1);
    for (const p of await after.packs()) assert.equal(await after.dropPack(p), p.bytes, `${name}: GC drops ${p.name}`);
    assert.deepEqual(await after.packs(), []);
    await after.close();
    await crashed.close().catch(() => undefined); // releases its files or client; its sync still fails
  }
});
