import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { copyFileSync, mkdirSync, mkdtempSync, readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { exportCurrentSnapshot } from '../../src/broker/desktops/snapshot-image.js';
import { checkout, enroll, upload, type ClientEnv } from '../../src/client/ops.js';
import { startStandaloneTransfer } from '../../src/transfer/standalone.js';
import type { TransferServer } from '../../src/transfer/server.js';
import { ADMIN, api, cleanup, makeImage, testBroker, transferStore, type Api, type TestBroker } from '../broker/harness.js';
import { readDesktop, writeDesktop } from '../support/laptop.js';
import { freshDatabase, testCluster } from '../support/postgres.js';

/**
 * Eight laptops check desktops out and in at once through two standalone transfer servers
 * whose slots (2 + 1) are fewer than the laptops, so jobs queue. Nothing may be lost: every
 * desktop's new snapshot is exactly what its own laptop wrote.
 *
 * The brokers are a list: one on SQLite; on PostgreSQL, `startBrokers` starts two on one database
 * and one chunk store, and the laptops get both URLs (half of them in the other order, so half
 * work through each broker).
 */
process.env.CARRYON_SCRYPT_N = '1024';
const LAPTOPS = 8;
const SLOTS = { 'ts-a': 2, 'ts-b': 1 } as const;
const DISK_MIB = 16;
const CHUNK = 256 * 1024;

type Broker = TestBroker;
let brokers: Broker[];
let http: Api;
const transfers: (TransferServer & { heartbeat(): Promise<void> })[] = [];

async function startBrokers(): Promise<Broker[]> {
  if (process.env.CARRYON_TEST_DATABASE !== 'postgres') return [await testBroker(undefined, { embeddedTransferSlots: 0 })];
  // Two brokers on one database and one chunk store, sharing the secrets as an operator would.
  const database = await freshDatabase(await testCluster());
  const root = mkdtempSync(join(tmpdir(), 'carryon-brokers-'));
  const a = await testBroker(join(root, 'a'), { database, embeddedTransferSlots: 0 });
  mkdirSync(join(root, 'b'));
  for (const f of ['master.key', 'token.key', 'signing.key', 'transfer.secret']) copyFileSync(join(root, 'a', f), join(root, 'b', f));
  const b = await testBroker(join(root, 'b'), { database, chunkStore: a.chunkStore, embeddedTransferSlots: 0, importDirs: [join(root, 'a')] });
  return [a, b];
}

before(async () => {
  brokers = await startBrokers();
  const first = brokers[0]!;
  http = api(first.url, first.fingerprint);
  for (const [id, slots] of Object.entries(SLOTS)) {
    transfers.push(await startStandaloneTransfer({
      id, brokerUrl: first.url, brokerFingerprint: first.fingerprint, secret: first.ctx.settings.transferSecret, slots, heartbeatSec: 1,
      storeDir: transferStore(first), masterKeyFile: join(first.dir, 'master.key'), port: 0, tlsDir: join(first.dir, `${id}-tls`),
    }));
  }
  const admin = await http.login(ADMIN.name, ADMIN.password);
  const image = makeImage(first.dir, DISK_MIB);
  for (let i = 0; i < LAPTOPS; i++) {
    const r = await http.call('POST', '/v1/admin/desktops', i === 0 ? { name: 'd0', image, config: { vcpus: 1, ramMiB: 512, minRamMiB: 256 } } : { name: `d${i}`, cloneOf: 'd0' }, admin);
    assert.equal(r.status, 201, JSON.stringify(r.body));
    await http.call('POST', '/v1/admin/users', { name: `u${i}`, password: `u${i}-password` }, admin);
    await http.call('POST', '/v1/admin/entitlements', { principalType: 'user', principal: `u${i}`, targetType: 'desktop', target: `d${i}` }, admin);
  }
});
after(async () => {
  for (const t of transfers) await t.close();
  await http.close();
  for (const b of brokers) {
    await b.close();
    cleanup(b.dir);
  }
});

interface Sample { inUse: Record<string, number>; queued: number }

/** Samples the scheduler through the admin API while the laptops work (what an operator sees). */
function watch(token: string): { samples: Sample[]; stop(): Promise<void> } {
  const samples: Sample[] = [];
  let running = true;
  const loop = (async () => {
    for (let i = 0; running && i < 100_000; i++) {
      const r = await http.call('GET', '/v1/admin/transfers', undefined, token);
      const body = r.body as { servers: { id: string; inUse: number }[]; queued: unknown[] };
      samples.push({ inUse: Object.fromEntries(body.servers.map((s) => [s.id, s.inUse])), queued: body.queued.length });
      await new Promise((res) => setTimeout(res, 25));
    }
  })();
  return { samples, stop: async () => { running = false; await loop; } };
}

/** Every job the scheduler ran, with its server and time slot (from the scheduler's store, either engine). */
async function jobRows(b: Broker): Promise<{ kind: string; state: string; server: string | null; startedAt: string | null; endedAt: string | null }[]> {
  return b.ctx.scheduler.history();
}

/** Most jobs a server held at once, from their [start, end) slots (an end frees the slot a start at the same instant takes). */
function peak(rows: Awaited<ReturnType<typeof jobRows>>, server: string): number {
  const events = rows.filter((r) => r.server === server && r.startedAt && r.endedAt)
    .flatMap((r) => [{ t: Date.parse(r.startedAt!), d: 1 }, { t: Date.parse(r.endedAt!), d: -1 }])
    .sort((a, b) => a.t - b.t || a.d - b.d);
  let cur = 0;
  let max = 0;
  for (const e of events) max = Math.max(max, (cur += e.d));
  return max;
}

test(`${LAPTOPS} laptops check out and in at once over 2 transfer servers with ${SLOTS['ts-a'] + SLOTS['ts-b']} slots: jobs queue, nothing is lost`, async () => {
  const admin = await http.login(ADMIN.name, ADMIN.password);
  const list = brokers.map((b) => b.url);
  const fingerprints = brokers.map((b) => b.fingerprint);
  const envs: ClientEnv[] = Array.from({ length: LAPTOPS }, (_, i) => ({
    home: join(brokers[0]!.dir, `laptop-${i}`), user: `u${i}`, password: async () => `u${i}-password`, log: () => undefined, pollMs: 50,
  }));
  for (const [i, env] of envs.entries()) {
    const order = i % 2 ? [...list].reverse() : list;
    await enroll(env, order, { fingerprint: i % 2 ? [...fingerprints].reverse() : fingerprints, name: `laptop-${i}` });
  }
  const watcher = watch(admin);
  const expected: Buffer[] = [];
  try {
    await Promise.all(envs.map(async (env, i) => {
      await checkout(env, `d${i}`);
      // Distinct data per laptop: its own pattern, in chunks no two laptops share.
      const fill = (n: number) => Buffer.alloc(20_000, `laptop ${i} write ${n};`);
      await writeDesktop(env, `d${i}`, [0, 1, 2].map((n) => ({ offset: (i * 3 + n) * CHUNK + 4096 * n, data: fill(n) })));
      expected[i] = await readDesktop(env, `d${i}`);
      const ci = await upload(env, `d${i}`, 'checkin');
      assert.equal(ci.changedChunks, 3, `laptop ${i}`);
    }));
  } finally {
    await watcher.stop();
  }

  // Every desktop's snapshot is exactly what its laptop held, and they all differ.
  const digests = new Set<string>();
  for (let i = 0; i < LAPTOPS; i++) {
    const out = join(brokers[0]!.dir, `d${i}.raw`);
    await exportCurrentSnapshot(brokers[0]!.ctx, `d${i}`, out);
    const server = readFileSync(out);
    assert.ok(server.equals(expected[i]!), `d${i}: the snapshot holds laptop ${i}'s writes and nothing else`);
    digests.add(createHash('sha256').update(server).digest('hex'));
  }
  assert.equal(digests.size, LAPTOPS);

  // Every job ran to the end, on a registered server, never more at once than its slots.
  const rows = await jobRows(brokers[0]!);
  assert.equal(rows.length, 2 * LAPTOPS, JSON.stringify(rows));
  assert.ok(rows.every((r) => r.state === 'done' && r.server && r.server in SLOTS), JSON.stringify(rows));
  for (const [id, slots] of Object.entries(SLOTS)) {
    const p = peak(rows, id);
    assert.ok(p >= 1 && p <= slots, `${id}: at most ${slots} jobs at once (peak ${p})`);
    assert.ok(watcher.samples.every((s) => (s.inUse[id] ?? 0) <= slots), `${id}: the admin view never showed more than ${slots} in use`);
  }
  assert.ok(watcher.samples.some((s) => s.queued > 0), 'some jobs waited in the queue');
  // Which server gets which kind of job depends on timing; each must have moved data.
  for (const t of transfers) assert.ok(t.stats.bytesOut + t.stats.bytesIn > 0, `${t.id} moved data`);
});
