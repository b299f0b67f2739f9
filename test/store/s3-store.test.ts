import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { SqlitePackIndex } from '../../src/store/pack-index.js';
import { dyingIndex } from '../support/dying-index.js';
import { parseS3Url } from '../../src/store/s3-config.js';
import { flakyProxy } from '../support/flaky-proxy.js';
import { openSwiftStore, startSwift, type SwiftServer } from '../support/swift.js';

const dir = mkdtempSync(join(tmpdir(), 'carryon-s3-'));
let swift: SwiftServer;
before(async () => {
  swift = await startSwift();
});
after(async () => {
  await swift?.stop();
  rmSync(dir, { recursive: true, force: true });
});
const id = (n: number) => n.toString(16).padStart(64, '0');

test('s3 URL: bucket, prefix, endpoint, index; no credentials in it', () => {
  const c = parseS3Url('s3://chunks/dc1?endpoint=http%3A%2F%2F127.0.0.1%3A8080&region=r1&index=/srv/i.sqlite');
  assert.equal(c.bucket, 'chunks');
  assert.equal(c.prefix, 'dc1/');
  assert.equal(c.endpoint, 'http://127.0.0.1:8080');
  assert.equal(c.forcePathStyle, true);
  assert.equal(c.indexPath, '/srv/i.sqlite');
  assert.throws(() => parseS3Url('s3://key:secret@chunks'), /credentials/);
  assert.throws(() => parseS3Url('s3://chunks?bogus=1'), /unknown/);
});

test('s3 store: a large pack goes up in parts; single blobs come back by ranged GETs', async () => {
  const seen: string[] = [];
  const proxy = await flakyProxy(swift.endpoint, (req) => (seen.push(`${req.method} ${req.url} ${req.headers.range ?? ''}`), 'ok'));
  try {
    const s = await openSwiftStore(swift, join(dir, 'multi'), 'multipart', '&packMiB=12&partMiB=5', { endpoint: proxy.url });
    const blobs = Array.from({ length: 48 }, () => randomBytes(256 * 1024));
    await Promise.all(blobs.map((b, i) => s.put(id(i), b, { defer: true })));
    await s.sync();
    assert.ok(seen.some((l) => /^POST .*\?uploads/.test(l)), 'a multipart upload was started');
    assert.ok(seen.filter((l) => /^PUT .*partNumber=/.test(l)).length >= 3, 'in several parts');
    seen.length = 0;
    assert.deepEqual(await s.get(id(17)), blobs[17]);
    assert.match(seen.find((l) => l.startsWith('GET'))!, /bytes=\d+-\d+$/, 'one ranged GET for one blob');
    const packs = await s.packs();
    assert.ok(packs.length >= 1 && packs.every((p) => p.bytes > 0));
    assert.equal(packs.reduce((a, p) => a + p.liveBytes, 0), packs.reduce((a, p) => a + p.bytes, 0));
    await s.close();
  } finally {
    await proxy.close();
  }
});

test('s3 store: a blob is published only once its pack is durable; transient faults are retried', async () => {
  let down = false;
  const proxy = await flakyProxy(swift.endpoint, (req, n) => (down && req.method === 'PUT' ? '503' : n % 3 === 1 ? (n % 2 ? '503' : 'reset') : 'ok'));
  try {
    const root = join(dir, 'durable');
    const s = await openSwiftStore(swift, root, 'durable', '&maxAttempts=4', { endpoint: proxy.url });
    await s.put(id(1), Buffer.from('one'));
    assert.ok(proxy.failed > 0, 'faults were injected');
    assert.deepEqual(await s.get(id(1)), Buffer.from('one'), 'and retried through');
    down = true;
    await s.put(id(2), Buffer.from('two'), { defer: true });
    await assert.rejects(s.sync(), /kept for the next sync/);
    // Another process (or the next start) sees only what was published.
    const other = await openSwiftStore(swift, root, 'durable');
    assert.equal(await other.get(id(2)), null);
    assert.deepEqual(await other.get(id(1)), Buffer.from('one'));
    assert.deepEqual(await s.get(id(2)), Buffer.from('two'), 'the writer still serves its pending blob');
    down = false;
    await s.sync();
    assert.deepEqual(await other.get(id(2)), Buffer.from('two'));
    await other.close();
    await s.close();
  } finally {
    await proxy.close();
  }
});

test('s3 store: sweep and compaction free the dead share of a pack', async () => {
  const s = await openSwiftStore(swift, join(dir, 'compact'), 'compact');
  const blobs = Array.from({ length: 20 }, () => randomBytes(64 * 1024));
  await Promise.all(blobs.map((b, i) => s.put(id(100 + i), b, { defer: true })));
  await s.sync();
  const [pack] = await s.packs();
  assert.ok(pack && !pack.active);
  const swept = await s.sweep(Array.from({ length: 15 }, (_, i) => id(100 + i)), Date.now() + 1);
  assert.equal(swept.blobs, 15);
  const res = await s.compactPack(pack);
  assert.equal(res.moved, 5);
  assert.equal(res.freedBytes, pack.bytes);
  const after = await s.packs();
  assert.equal(after.length, 1);
  assert.ok(after[0]!.bytes < pack.bytes / 3);
  for (let i = 15; i < 20; i++) assert.deepEqual(await s.get(id(100 + i)), blobs[i]);
  assert.equal(await s.get(id(100)), null);
  await s.close();
});

test('s3 store: getMany answers neighbours in one ranged GET and agrees with get', async () => {
  const seen: string[] = [];
  const proxy = await flakyProxy(swift.endpoint, (req) => (seen.push(`${req.method} ${req.headers.range ?? ''}`), 'ok'));
  try {
    const s = await openSwiftStore(swift, join(dir, 'many'), 'many', '', { endpoint: proxy.url });
    const blobs = Array.from({ length: 40 }, () => randomBytes(100 * 1024));
    await Promise.all(blobs.map((b, i) => s.put(id(500 + i), b, { defer: true })));
    await s.sync();
    await s.put(id(999), Buffer.from('pending'), { defer: true });
    seen.length = 0;
    const ids = [id(539), ...Array.from({ length: 32 }, (_, i) => id(500 + i)), id(998), id(999), id(510)];
    const got = await s.getMany(ids);
    assert.equal(seen.filter((l) => l.startsWith('GET')).length, 2, 'one request for 32 neighbours (and the repeat), one for the distant blob');
    assert.deepEqual(got[0], blobs[39]);
    for (let i = 0; i < 32; i++) assert.deepEqual(got[1 + i], blobs[i]);
    assert.equal(got[33], null, 'absent');
    assert.deepEqual(got[34], Buffer.from('pending'), 'not yet published: from memory');
    assert.deepEqual(got[35], blobs[10], 'a repeat');
    await s.close();
  } finally {
    await proxy.close();
  }
});

test('s3 store: a pack uploaded but not yet indexed (index commit failed) is served from the object, then published by the next sync', async () => {
  const root = join(dir, 'unindexed');
  const index = SqlitePackIndex.open(join(root, 'index.sqlite'));
  const failing = { insert: true };
  const flaky = dyingIndex(index, failing, 'index unavailable');
  const s = await openSwiftStore(swift, root, 'unindexed', '', { index: flaky });
  const blob = randomBytes(50_000);
  await s.put(id(7), blob, { defer: true });
  await assert.rejects(s.sync(), /index unavailable/);
  assert.deepEqual(await s.get(id(7)), blob, 'read back from the uploaded pack object');
  assert.deepEqual((await s.getMany([id(7)]))[0], blob);
  assert.equal(await index.get(id(7)), null, 'not published');
  failing.insert = false;
  await s.sync();
  assert.deepEqual(await index.get(id(7)).then((l) => l?.length), blob.length);
  assert.deepEqual(await s.get(id(7)), blob);
  await s.close();
});
