import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { mkdtempSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { GetObjectCommand, ListObjectsV2Command, PutObjectCommand, S3Client } from '@aws-sdk/client-s3';
import { freshBucket, swiftStoreUrl, testSwift, type SwiftEndpoint } from '../support/swift.js';
import { sealChunk } from '../../src/core/chunks/blob.js';
import { deltaRecordId } from '../../src/core/chunks/delta-record.js';
import { unwrapLineageKeys, type LineageKeys } from '../../src/core/keys.js';
import { decodeManifest, referencedChunks } from '../../src/core/chunks/manifest.js';
import { beginUpload, checkOut, commitUpload, markTransferred, ownedCheckout } from '../../src/broker/checkouts.js';
import { HttpError } from '../../src/broker/http.js';
import { pushReceipt, receiptKey } from '../../src/core/tokens/push-receipt.js';
import { collectGarbage } from '../../src/broker/gc/collect.js';
import { applyRetention } from '../../src/broker/gc/retention.js';
import { verifyStore } from '../../src/broker/gc/verify.js';
import type { BrokerContext } from '../../src/broker/context.js';
import type { RunningBroker } from '../../src/broker/start.js';
import type { CollectableStore } from '../../src/store/chunk-store.js';
import type { SnapshotRow } from '../../src/broker/db/metadata.js';
import { ADMIN, api, cleanup, makeImage, testBroker, type Api } from './harness.js';

const CHUNK = 256 * 1024;
const HOST = { cpus: 4, ramBytes: 8 * 2 ** 30, freeDiskBytes: 2 ** 40 };
let broker: RunningBroker & { dir: string };
let ctx: BrokerContext;
let http: Api;
let admin: string;
let deviceId: string;
let swift: SwiftEndpoint | null = null;
let bucket = '';

async function startFor(kind: 'pack' | 's3'): Promise<void> {
  const dir = mkdtempSync(join(tmpdir(), 'carryon-broker-'));
  let chunkStore = join(dir, 'chunks'); // opt-out of an S3 run: this half flips bytes in local pack files
  if (kind === 's3') {
    swift = await testSwift();
    bucket = freshBucket();
    // The broker's S3 client finds its credentials the usual way: the environment.
    chunkStore = swiftStoreUrl(swift, bucket, 'dc');
  }
  broker = await testBroker(dir, { chunkStore, chunkStoreOptions: { touchSlackMs: 0 } });
  ctx = broker.ctx;
  http = api(broker.url, broker.fingerprint);
  admin = await http.login(ADMIN.name, ADMIN.password);
  await ctx.meta.createUser({ name: 'alice', passwordHash: null, role: 'user' });
  deviceId = await ctx.meta.createDevice({ user: 'alice', name: 'laptop', publicKey: 'unused', host: {} });
}

async function stop(): Promise<void> {
  await http?.close();
  await broker?.close();
  if (broker) cleanup(broker.dir);
  swift = null;
}

/** Flips one byte inside the first record of every pack (a blob's ciphertext), file or object. */
async function corruptPacks(kind: 'pack' | 's3', at = 60): Promise<void> {
  const flip = (data: Buffer) => (data.length >= 100 ? ((data[at] = data[at]! ^ 0xff), true) : false);
  if (kind === 'pack') {
    const dir = join(broker.dir, 'chunks', 'packs');
    for (const name of readdirSync(dir)) {
      const data = readFileSync(join(dir, name));
      if (flip(data)) writeFileSync(join(dir, name), data);
    }
    return;
  }
  const s3 = new S3Client({ endpoint: swift!.endpoint, region: swift!.region, forcePathStyle: true, requestChecksumCalculation: 'WHEN_REQUIRED', credentials: { accessKeyId: swift!.accessKeyId, secretAccessKey: swift!.secretAccessKey } });
  try {
    const list = await s3.send(new ListObjectsV2Command({ Bucket: bucket, Prefix: 'dc/packs/' }));
    for (const o of list.Contents ?? []) {
      const data = Buffer.from(await (await s3.send(new GetObjectCommand({ Bucket: bucket, Key: o.Key! }))).Body!.transformToByteArray());
      if (flip(data)) await s3.send(new PutObjectCommand({ Bucket: bucket, Key: o.Key!, Body: data }));
    }
  } finally {
    s3.destroy();
  }
}

async function desktop(name: string, mib = 2): Promise<{ id: string; keys: LineageKeys }> {
  const r = await http.call('POST', '/v1/admin/desktops', { name, image: makeImage(broker.dir, mib, `${name}.raw`), config: { vcpus: 1, ramMiB: 512, minRamMiB: 256 } }, admin);
  assert.equal(r.status, 201, JSON.stringify(r.body));
  const d = (await ctx.meta.getDesktop(name))!;
  await ctx.meta.addEntitlement({ principalType: 'user', principal: 'alice', targetType: 'desktop', target: d.id });
  return { id: d.id, keys: unwrapLineageKeys(ctx.secrets.masterKey, (await ctx.meta.getLineageKeys(d.lineageId))!, `lineage:${d.lineageId}`) };
}

async function currentChunks(name: string): Promise<(string | null)[]> {
  const snap = (await ctx.meta.getSnapshot((await ctx.meta.getDesktop(name))!.currentSnapshot!))!;
  return decodeManifest((await ctx.store.getManifest(snap.disks[0]!.digest))!).chunks;
}

/** Blobs the simulated laptop holds (it pushes any of them the commit finds missing again). */
const laptop = new Map<string, Buffer>();

/**
 * What a laptop and its transfer server do for a check-in, without either: check out, change
 * `edit` chunks (new random content, or given IDs of chunks the laptop holds), store each as the
 * server would (a copy it has is kept once) with its push receipt, commit; a commit that finds
 * chunks swept meanwhile (`missing-chunks`) pushes those again (a few times at most: below). `between` runs before the commit.
 */
async function cycle(name: string, keys: LineageKeys, edit: Record<number, string | 'new'>, between?: () => Promise<void>) {
  const co = await checkOut(ctx, 'alice', (await ctx.meta.getDesktop(name))!, { deviceId, host: HOST });
  await markTransferred(ctx, await ownedCheckout(ctx, 'alice', co.checkout.id, 'transfer-end'));
  const changes: [number, string][] = [];
  for (const [i, v] of Object.entries(edit)) {
    if (v === 'new') {
      const s = sealChunk(keys, randomBytes(CHUNK));
      laptop.set(s.id, s.blob);
      changes.push([Number(i), s.id]);
    } else changes.push([Number(i), v]);
  }
  await beginUpload(ctx, await ownedCheckout(ctx, 'alice', co.checkout.id, 'checkin'), 'checkin');
  const push = async (ids: string[]) => {
    for (const id of ids) await ctx.store.put(id, laptop.get(id)!, { defer: true });
    await ctx.store.sync();
  };
  const lineage = (await ctx.meta.getDesktop(name))!.lineageId;
  const key = receiptKey(ctx.secrets.masterKey);
  const receipts = Object.fromEntries(changes.map(([, id]) => [id, pushReceipt(key, { checkoutId: co.checkout.id, keyContext: `lineage:${lineage}`, id })]));
  await push(changes.map(([, id]) => id));
  await between?.();
  const commit = () => commitUpload(ctx, 'alice', co.checkout.id, 'checkin', [{ name: 'disk0', changes }], receipts);
  // With no grace at all (these tests), a GC may also start between a re-push and its commit: on a
  // loaded box that happened (CI, two test files at once). The product's grace (hours) covers that
  // window and the laptop sends once more; here a few times, and the commit must then succeed.
  for (let attempt = 0; ; attempt++) {
    try {
      return await commit();
    } catch (err) {
      if (!(err instanceof HttpError) || err.code !== 'missing-chunks' || attempt >= 3) throw err;
      await push(err.extra.missing as string[]);
    }
  }
}

test('retention keeps the last N, young replicas and pinned snapshots', () => {
  const day = 86_400_000;
  const now = Date.parse('2026-06-30T00:00:00Z');
  const snap = (id: string, kind: string, daysAgo: number): SnapshotRow => ({ id, desktopId: 'd', parentId: null, kind, disks: [], createdAt: new Date(now - daysAgo * day).toISOString() });
  const all = [snap('import', 'import', 100), snap('r-old', 'replica', 60), snap('pinned', 'checkpoint', 50), snap('r-young', 'replica', 5), snap('c1', 'checkin', 3), snap('c2', 'checkin', 1)];
  const { keep, drop } = applyRetention(all, new Set(['pinned']), { keepLast: 2, keepReplicaDays: 30 }, now);
  assert.deepEqual(keep.map((s) => s.id), ['pinned', 'r-young', 'c1', 'c2']);
  assert.deepEqual(drop.map((s) => s.id), ['import', 'r-old']);
});

for (const kind of ['pack', 's3'] as const) {
  describe(`gc and verify on the ${kind} store`, () => {
    before(() => startFor(kind));
    after(stop);

    test('gc: dry run changes nothing; then retention, sweep and compaction reclaim space; verify finds every kept snapshot whole', async () => {
      const d = await desktop('twenty', 2);
      for (let i = 0; i < 10; i++) await cycle('twenty', d.keys, { [i % 4]: 'new', [4 + (i % 2)]: 'new' });
      const snapshots = (await ctx.meta.listSnapshots(d.id)).length;
      assert.equal(snapshots, 21, 'import + 10 × (checkpoint + check-in)');
      const before = await ctx.store.stats();

      // Its own retention wins over the run's; reset, the run's applies again.
      const own = await http.call('PUT', `/v1/admin/desktops/twenty/retention`, { keepLast: 15, keepReplicaDays: 0 }, admin);
      assert.equal(own.status, 200, JSON.stringify(own.body));
      const ownDry = (await http.call('POST', '/v1/admin/gc', { dryRun: true, keepLast: 3, graceHours: 0 }, admin)).body.report as { snapshots: { deleted: unknown[] } };
      assert.equal(ownDry.snapshots.deleted.length, snapshots - 15);
      await http.call('PUT', `/v1/admin/desktops/twenty/retention`, { reset: true }, admin);
      assert.deepEqual((await http.call('GET', `/v1/admin/desktops/twenty/retention`, undefined, admin)).body, { retention: null });

      const dry = (await http.call('POST', '/v1/admin/gc', { dryRun: true, keepLast: 3, graceHours: 0 }, admin)).body.report as { snapshots: { deleted: unknown[] }; blobs: { swept: number }; reclaimedBytes: number };
      assert.equal(dry.snapshots.deleted.length, snapshots - 3);
      assert.ok(dry.blobs.swept > 0 && dry.reclaimedBytes > 0, JSON.stringify(dry));
      assert.equal((await ctx.meta.listSnapshots(d.id)).length, snapshots, 'a dry run deletes nothing');
      assert.deepEqual(await ctx.store.stats(), before);

      const r = await http.call('POST', '/v1/admin/gc', { keepLast: 3, graceHours: 0, compactThreshold: 0.2 }, admin);
      assert.equal(r.status, 200, JSON.stringify(r.body));
      const report = r.body.report as { snapshots: { deleted: unknown[] }; blobs: { swept: number; sweptBytes: number }; packs: { compacted: number; dropped: number }; reclaimedBytes: number };
      assert.equal(report.snapshots.deleted.length, snapshots - 3);
      assert.equal(report.blobs.swept, dry.blobs.swept, 'the dry run predicted the sweep');
      assert.ok(report.packs.compacted + report.packs.dropped > 0 && report.reclaimedBytes > 0, JSON.stringify(report));
      assert.equal((await ctx.meta.listSnapshots(d.id)).length, 3);
      const usage = await (ctx.store as CollectableStore).packs();
      assert.ok(usage.every((p) => p.active || p.liveBytes >= p.bytes * 0.8), 'what stays is mostly alive');

      const v = (await http.call('POST', '/v1/admin/verify', {}, admin)).body.report as { damagedCount: number; damagedSnapshots: unknown[]; chunksChecked: number };
      assert.equal(v.damagedCount, 0);
      assert.deepEqual(v.damagedSnapshots, []);
      assert.ok(v.chunksChecked > 0);
      // Manifests no kept snapshot names go too (past their own grace, here none). S3's
      // Last-Modified is in whole seconds (Swift rounds up): the run's clock is a second and a half on.
      const m = await collectGarbage(ctx.meta, ctx.store, { keepLast: 3, keepReplicaDays: 0, graceMs: 0, manifestGraceMs: 0 }, () => Date.now() + 1500);
      assert.deepEqual(m.manifests, { total: 11, deleted: 9 }, 'import + 10 check-ins; the last 3 snapshots name 2');
      assert.equal((await verifyStore(ctx.meta, ctx.store, ctx.secrets.masterKey)).damagedSnapshots.length, 0);
      // Nothing left to collect: a second run sweeps nothing.
      const again = (await http.call('POST', '/v1/admin/gc', { keepLast: 3, graceHours: 0 }, admin)).body.report as { blobs: { swept: number } };
      assert.equal(again.blobs.swept, 0);
    });

    test('gc never deletes what a check-in in flight or a just-committed snapshot needs (GC and check-ins racing)', async () => {
      const d = await desktop('race', 2);
      const original = await currentChunks('race');
      const old0 = original[0]!;
      const old4 = original[4]!;
      laptop.set(old4, (await ctx.store.get(old4))!);
      // Push the import (the only snapshot naming old0 and old4) out of keepLast = 2.
      for (let i = 0; i < 3; i++) await cycle('race', d.keys, { 0: 'new', 4: 'new' });
      assert.ok(!(await currentChunks('race')).includes(old0));
      const gcNow = () => collectGarbage(ctx.meta, ctx.store, { keepLast: 2, keepReplicaDays: 0, graceMs: 0, compactThreshold: 0.01 });

      // 0. A check-in reverts chunk 4 to old4 (the server keeps its one copy), then GC runs before
      //    the commit and sweeps it (no grace here): the commit says so, the laptop sends it again.
      await cycle('race', d.keys, { 4: old4 }, async () => {
        await new Promise((r) => setTimeout(r, 5));
        const r = await gcNow();
        assert.ok(r.snapshots.deleted.length > 0 && r.blobs.swept > 0);
      });
      assert.ok((await ctx.store.get(old4)) !== null);

      // 1. A check-in starts after GC has marked: it reverts chunk 0 to prev0, which no kept snapshot
      //    names any more, and commits while GC sweeps.
      const prev0 = (await currentChunks('race'))[0]!;
      for (let i = 0; i < 2; i++) await cycle('race', d.keys, { 0: 'new' });
      const store = ctx.store as CollectableStore;
      let raced: Promise<unknown> | null = null;
      const usage = store.usage.bind(store);
      store.usage = async function* () {
        raced ??= cycle('race', d.keys, { 0: prev0, 1: 'new' });
        await raced; // the check-in asked `missing` (marking old0 used) and committed
        yield* usage();
      };
      try {
        const report = await gcNow();
        assert.ok(report.snapshots.deleted.length > 0);
      } finally {
        store.usage = usage;
      }
      assert.ok((await ctx.store.get(prev0)) !== null, 'the blob the racing check-in deduplicated against survived');

      // 2. Free-running: check-ins (each deduplicating against an unreferenced old blob) and GC runs at once.
      const pastBlobs = new Set<string>();
      for (const s of await ctx.meta.listSnapshots(d.id)) for (const id of referencedChunks(decodeManifest((await ctx.store.getManifest(s.disks[0]!.digest))!))) pastBlobs.add(id);
      for (const id of pastBlobs) laptop.set(id, (await ctx.store.get(id))!);
      const gcs = (async () => {
        for (let i = 0; i < 6; i++) await collectGarbage(ctx.meta, ctx.store, { keepLast: 1, keepReplicaDays: 0, graceMs: 0, compactThreshold: 0.01 });
      })();
      const checkins = (async () => {
        const old = [...pastBlobs];
        for (let i = 0; i < 6; i++) await cycle('race', d.keys, { 2: old[i % old.length]!, 3: 'new' });
      })();
      await Promise.all([gcs, checkins]);

      // 3. A check-out in flight: its checkpoint is pinned and every chunk stays readable.
      const co = await checkOut(ctx, 'alice', (await ctx.meta.getDesktop('race'))!, { deviceId, host: HOST });
      assert.ok('disks' in co, 'not a desktop on a host');
      await collectGarbage(ctx.meta, ctx.store, { keepLast: 1, keepReplicaDays: 0, graceMs: 0, compactThreshold: 0.01 });
      for (const id of referencedChunks(decodeManifest(Buffer.from(co.disks[0]!.manifest, 'base64')))) assert.ok(await ctx.store.get(id), `chunk ${id} of the check-out in flight is readable`);
      await markTransferred(ctx, await ownedCheckout(ctx, 'alice', co.checkout.id, 'transfer-end'));

      const v = await verifyStore(ctx.meta, ctx.store, ctx.secrets.masterKey);
      assert.equal(v.damagedCount, 0, JSON.stringify(v.damaged.slice(0, 3)));
      assert.deepEqual(v.damagedSnapshots, []);
    });

    test('a chunk\'s delta record lives exactly as long as the chunk', async () => {
      const d = await desktop('records', 2);
      const imported = (await currentChunks('records'))[0]!;
      await cycle('records', d.keys, { 0: 'new' });
      const current = (await currentChunks('records'))[0]!;
      // As a push keeps them (transfer/push-session.ts): beside the chunk each pages frame made.
      for (const id of [imported, current]) await ctx.store.put(deltaRecordId(id), randomBytes(300), { defer: true });
      await ctx.store.sync();
      // Stores mark use in whole seconds: the run's clock is a second and a half on (as above).
      await collectGarbage(ctx.meta, ctx.store, { keepLast: 1, keepReplicaDays: 0, graceMs: 0 }, () => Date.now() + 1500);
      assert.equal(await ctx.store.get(imported), null, 'the import is past keepLast: its chunk went');
      assert.equal(await ctx.store.get(deltaRecordId(imported)), null, 'and its record with it');
      assert.ok(await ctx.store.get(deltaRecordId(current)), 'a kept chunk keeps its record');
    });

    test('verify reports a damaged blob and the snapshots it breaks; --sample reads a share', async () => {
      await desktop('scrub', 2);
      const sample = (await http.call('POST', '/v1/admin/verify', { samplePercent: 10 }, admin)).body.report as { chunksChecked: number; chunksReferenced: number };
      assert.ok(sample.chunksChecked < sample.chunksReferenced && sample.chunksChecked >= 1);
      await corruptPacks(kind);
      const r = await http.call('POST', '/v1/admin/verify', {}, admin);
      const report = r.body.report as { damagedCount: number; damaged: { problem: string }[]; damagedSnapshots: { desktop: string; badChunks: number }[] };
      assert.ok(report.damagedCount >= 1);
      assert.equal(report.damaged[0]!.problem, 'corrupt');
      assert.ok(report.damagedSnapshots.length >= 1 && report.damagedSnapshots.every((s) => s.badChunks >= 1));
      const events = (await http.call('GET', '/v1/admin/events?limit=10000', undefined, admin)).body.events as { action: string }[];
      assert.ok(events.some((e) => e.action === 'snapshot-damaged'));
      // A record whose header no longer matches the index (byte 5 is inside its ID) is damage too.
      await corruptPacks(kind, 5);
      const again = (await http.call('POST', '/v1/admin/verify', {}, admin)).body.report as { damaged: { problem: string; detail: string }[] };
      assert.ok(again.damaged.some((d) => d.problem === 'corrupt' && /does not hold chunk/.test(d.detail)), JSON.stringify(again.damaged));
    });
  });
}
