import assert from 'node:assert/strict';
import { cpSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { CarryonError } from '../../src/core/errors.js';
import { randomBytes } from 'node:crypto';
import { execFile } from 'node:child_process';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { isZero } from '../../src/core/chunks/chunking.js';
import { after, before, test } from 'node:test';
import { checkout, enroll, exportDisk, loginOnline, release, status, upload, type ClientEnv } from '../../src/client/ops.js';
import { moveTrustedClock, readDesktop, writeDesktop } from '../support/laptop.js';
import { serveDesktop } from '../../src/client/ops/serve.js';
import type { RunningBroker } from '../../src/broker/start.js';
import type { CollectableStore } from '../../src/store/chunk-store.js';
import { ADMIN, api, cleanup, makeImage, testBroker, type Api, serverDisk as sharedServerDisk } from '../broker/harness.js';
import { RateLimiter } from '../../src/transfer-client/rate-limit.js';

const execFileP = promisify(execFile);
process.env.CARRYON_SCRYPT_N = '1024';
let broker: RunningBroker & { dir: string };
let http: Api;
let admin: string;
const CHUNK = 256 * 1024;
const logs: string[] = [];

function env(home: string, password = 'alice-password'): ClientEnv {
  return { home, user: 'alice', password: async () => password, log: (l) => logs.push(l), pollMs: 20 };
}

before(async () => {
  broker = await testBroker();
  http = api(broker.url, broker.fingerprint);
  admin = await http.login(ADMIN.name, ADMIN.password);
  await http.call('POST', '/v1/admin/users', { name: 'alice', password: 'alice-password' }, admin);
  const image = makeImage(broker.dir, 32);
  for (const name of ['win11', 'ubuntu']) {
    const r = await http.call('POST', '/v1/admin/desktops', name === 'win11' ? { name, image, config: { vcpus: 2, ramMiB: 1024, minRamMiB: 256 } } : { name, cloneOf: 'win11' }, admin);
    assert.equal(r.status, 201, JSON.stringify(r.body));
    await http.call('POST', '/v1/admin/entitlements', { principalType: 'user', principal: 'alice', targetType: 'desktop', target: name }, admin);
  }
});
after(async () => {
  await http.close();
  await broker.close();
  cleanup(broker.dir);
});

const serverDisk = (desktop: string) => sharedServerDisk(broker, desktop);

test('check-out, change 1% of chunks, check-in moves only those; server snapshot equals the laptop disk', async () => {
  const home = join(broker.dir, 'laptop');
  await enroll(env(home), broker.url, { fingerprint: broker.fingerprint, name: 'laptop' });
  const before = broker.transfer!.stats.bytesOut;
  const co = await checkout(env(home), 'win11');
  const out = broker.transfer!.stats.bytesOut - before;
  assert.ok(co.bytesMoved > 0 && out >= co.bytesMoved, 'blobs travelled');
  const [st] = await status(env(home), 'win11');
  assert.equal(st!.safeOffline, true);
  assert.equal(st!.percentLocal, 100);

  // A second desktop on the same laptop has a chain of its own.
  await checkout(env(home), 'ubuntu');
  await release(env(home), 'ubuntu', 'rollback');

  // Change 1 chunk in 128 (a 32 MiB disk has 128 chunks of 256 KiB): 2 chunks here.
  const touched = [5, 77];
  await writeDesktop(env(home), 'win11', touched.map((i) => ({ offset: i * CHUNK + 1000, data: randomBytes(5000) })));
  const laptopDisk = await readDesktop(env(home), 'win11');
  await assert.rejects(exportDisk(env(home), 'win11', join(broker.dir, 'nope.raw'), 'raw'), (e: unknown) => e instanceof CarryonError && e.code === 'export-denied');
  // While the desktop is in use (served, as a running VM would hold it), check-in refuses clearly.
  const served = await serveDesktop(env(home), 'win11');
  await assert.rejects(upload(env(home), 'win11', 'checkin'), (e: unknown) => e instanceof CarryonError && e.code === 'disk-busy' && /stop it first/.test(e.message));
  await served.close();
  const inBefore = broker.transfer!.stats.bytesIn;
  const ci = await upload(env(home), 'win11', 'checkin');
  const moved = broker.transfer!.stats.bytesIn - inBefore;
  assert.equal(ci.changedChunks, 2);
  assert.equal(ci.chunksSent, 2);
  // Each write spans two 4 KiB pages of its chunk: those pages travel as a delta, not the chunk.
  assert.ok(moved < 2 * (2 * 4096 + 300), `only the changed pages travelled (${moved} bytes)`);
  assert.ok((await serverDisk('win11')).equals(laptopDisk), 'server snapshot re-assembles byte-identical');
});

test('replicate then rollback; offline status with the broker unreachable; lease expiry; copied vault refuses', async () => {
  const home = join(broker.dir, 'laptop');
  await checkout(env(home), 'win11');
  await writeDesktop(env(home), 'win11', [{ offset: 3 * CHUNK, data: randomBytes(CHUNK) }]);
  assert.ok(((await status(env(home), 'win11'))[0]!.dirtyBytes ?? 0) >= CHUNK, 'the change shows before the replica');
  const rep = await upload(env(home), 'win11', 'replicate');
  assert.equal(rep.chunksSent, 1);
  const [afterRep] = await status(env(home), 'win11');
  assert.equal(afterRep!.dirtyBytes, 0, 'the restore point is the new base');
  assert.ok(afterRep!.lastReplicationAt);

  // Offline: status opens with the password and the lease, no broker involved.
  const offlineEnv = env(home);
  const devFile = join(home, 'device.json');
  const saved = readFileSync(devFile, 'utf8');
  writeFileSync(devFile, saved.replace(/"brokerUrl": "[^"]+"/, '"brokerUrl": "https://127.0.0.1:1"'));
  assert.equal((await status(offlineEnv, 'win11'))[0]!.state, 'checked_out');
  await assert.rejects(upload(offlineEnv, 'win11', 'checkin'), { code: 'offline' });
  writeFileSync(devFile, saved);

  // Wrong password and a vault copied to another device do not open.
  await assert.rejects(status(env(home, 'nope'), 'win11'), { code: 'vault-locked' });
  const copy = join(broker.dir, 'laptop-copy');
  cpSync(home, copy, { recursive: true });
  writeFileSync(join(copy, 'device.secret'), randomBytes(32));
  await assert.rejects(status(env(copy), 'win11'), { code: 'vault-locked' });
  // A home that lost its device secret says so and what to do, not a raw ENOENT.
  rmSync(join(copy, 'device.secret'));
  await assert.rejects(status(env(copy), 'win11'), (e: unknown) => e instanceof CarryonError && e.code === 'home-damaged' && /device\.secret is missing.*enrol again/.test(e.message));

  // Time moves past the lease (the vault's trusted clock records it): it refuses to open; the
  // system clock, back at today, does not help. An online login re-establishes broker time.
  await moveTrustedClock(home, 'win11', 400 * 24 * 3600_000);
  const [expired] = await status(env(home), 'win11');
  assert.match(expired!.problem ?? '', /lease expired/, 'status still answers, and says what to do');
  assert.equal(expired!.safeOffline, false, 'a desktop that will not open is not safe to take offline');
  assert.equal(expired!.dirtyBytes, null, 'no change figure without the keys to read it');
  await loginOnline(env(home));
  assert.equal((await status(env(home), 'win11'))[0]!.problem, null);

  const rb = await release(env(home), 'win11', 'rollback');
  assert.equal(rb.state, 'rolled_back');
  const list = await http.call('GET', '/v1/admin/checkouts', undefined, admin);
  assert.equal((list.body.checkouts as unknown[]).length, 0, 'unlocked');
});

test('a chunk collected between its push and the commit (a check-in slower than GC\'s grace) is sent again; the snapshot is whole', async () => {
  const home = join(broker.dir, 'laptop');
  await checkout(env(home), 'win11');
  await writeDesktop(env(home), 'win11', [{ offset: 9 * CHUNK + 8192, data: randomBytes(4096) }, { offset: 40 * CHUNK, data: randomBytes(CHUNK) }]);
  const laptopDisk = await readDesktop(env(home), 'win11');
  // The commit's presence check is the first one with new chunks: GC sweeps one of them just before it.
  const store = broker.ctx.store as CollectableStore;
  const missing = store.missing.bind(store);
  let swept: string | null = null;
  store.missing = async (ids) => {
    if (!swept && ids.length) {
      swept = ids[0]!;
      assert.equal((await store.sweep([swept], Date.now() + 60_000)).blobs, 1);
    }
    return missing(ids);
  };
  try {
    logs.length = 0;
    const ci = await upload(env(home), 'win11', 'checkin');
    assert.ok(swept, 'the commit checked its new chunks');
    assert.equal(ci.changedChunks, 2);
    assert.equal(ci.chunksSent, 3, 'the two changed chunks, then the collected one again');
    assert.ok(logs.some((l) => /no longer has 1 of the chunks sent; sending them again/.test(l)), logs.join('\n'));
  } finally {
    store.missing = missing;
  }
  assert.ok((await serverDisk('win11')).equals(laptopDisk), 'server snapshot re-assembles byte-identical');
});

test('a check-in cut off part-way and run again sends only the chunks the server had not named', async () => {
  const home = join(broker.dir, 'laptop');
  await checkout(env(home), 'win11');
  const touched = Array.from({ length: 40 }, (_, i) => i * 3 + 1);
  await writeDesktop(env(home), 'win11', touched.map((i) => ({ offset: i * CHUNK + 4096, data: randomBytes(4096) })));
  const laptopDisk = await readDesktop(env(home), 'win11');
  const abort = new AbortController();
  let done = 0;
  // Slowed (64 KiB/s for ≈ 160 KiB of pages) so the cut lands part-way whatever the load: unslowed, all 40 were sometimes named in the first answer.
  await assert.rejects(upload({ ...env(home), rateLimit: new RateLimiter(64 * 1024), signal: abort.signal, onProgress: (_k, p) => { done = p.chunksDone; if (p.chunksDone > 0) abort.abort(); } }, 'win11', 'checkin'));
  assert.ok(done > 0 && done < touched.length, `cut after ${done} chunks`);
  const ci = await upload(env(home), 'win11', 'checkin');
  assert.equal(ci.changedChunks, touched.length);
  assert.ok(ci.chunksSent <= touched.length - done, `${ci.chunksSent} sent again after ${done} were named`);
  assert.ok((await serverDisk('win11')).equals(laptopDisk), 'server snapshot re-assembles byte-identical');
});

test('a check-in whose commit was applied and its answer lost: the rerun recognises the snapshot and finishes as a check-in; with later writes it keeps them for a hand-back', async () => {
  const home = join(broker.dir, 'laptop');
  await checkout(env(home), 'win11');
  await writeDesktop(env(home), 'win11', [{ offset: 5 * CHUNK + 4096, data: randomBytes(8192) }, { offset: 30 * CHUNK, data: randomBytes(CHUNK) }]);
  const laptopDisk = await readDesktop(env(home), 'win11');
  // The broker applies the commit, then fails before answering (as a kill -9 of the laptop would lose the answer).
  const checkinWithAnswerLost = async () => {
    const scheduler = broker.ctx.scheduler;
    const finish = scheduler.finish.bind(scheduler);
    let dropped = false;
    scheduler.finish = async (jobId, outcome) => {
      if (outcome === 'done' && !dropped) {
        dropped = true;
        throw new Error('answer lost');
      }
      return finish(jobId, outcome);
    };
    try {
      await assert.rejects(upload(env(home), 'win11', 'checkin'));
    } finally {
      scheduler.finish = finish;
    }
    assert.ok(dropped);
  };
  await checkinWithAnswerLost();
  const committed = (await broker.ctx.meta.getDesktop('win11'))!.currentSnapshot!;
  assert.equal((await status(env(home), 'win11'))[0]!.desktop, 'win11', 'the laptop still holds its copy');
  logs.length = 0;
  const again = await upload(env(home), 'win11', 'checkin');
  assert.equal(again.snapshotId, committed, 'the snapshot the lost commit made');
  assert.equal(again.chunksSent, 0);
  assert.ok(logs.some((l) => /checked in win11: .*answer was lost/.test(l)), logs.join('\n'));
  assert.deepEqual(await status(env(home)), [], 'released as a check-in would');
  assert.ok((await serverDisk('win11')).equals(laptopDisk), 'server snapshot re-assembles byte-identical');

  // Lost again, but the desktop was written after the commit: not the same; the work is kept and can be handed back.
  await checkout(env(home), 'win11');
  await writeDesktop(env(home), 'win11', [{ offset: 7 * CHUNK, data: randomBytes(4096) }]);
  await checkinWithAnswerLost();
  await writeDesktop(env(home), 'win11', [{ offset: 8 * CHUNK, data: randomBytes(4096) }]);
  const later = await readDesktop(env(home), 'win11');
  await assert.rejects(upload(env(home), 'win11', 'checkin'), (e: CarryonError) => e.code === 'checkout-gone' && /checked in as .*changes that snapshot lacks.*carryon handback win11/.test(e.message));
  assert.equal((await status(env(home), 'win11'))[0]!.desktop, 'win11', 'the later work is kept');
  const back = await upload(env(home), 'win11', 'handback');
  const points = (await http.call('GET', '/v1/desktops/win11/restore-points', undefined, admin)).body.restorePoints as { id: string; kind: string; current: boolean }[];
  assert.deepEqual(points.filter((p) => p.id === back.snapshotId).map((p) => [p.kind, p.current]), [['handback', false]]);
  assert.ok(!(await serverDisk('win11')).equals(later), 'the current version is the check-in, not the later work');
});

test('after a force-unlock, check-in keeps the work and offers hand-back: a restore point (not current), audited, that an admin makes current', async () => {
  const home = join(broker.dir, 'laptop');
  await checkout(env(home), 'win11');
  await writeDesktop(env(home), 'win11', [{ offset: 12 * CHUNK + 4096, data: randomBytes(4096) }]);
  const laptopDisk = await readDesktop(env(home), 'win11');
  const before = await serverDisk('win11');
  const held = (await http.call('GET', '/v1/admin/checkouts', undefined, admin)).body.checkouts as { id: string }[];
  for (const c of held) assert.equal((await http.call('POST', `/v1/admin/checkouts/${c.id}/force-unlock`, {}, admin)).status, 200);
  await assert.rejects(upload(env(home), 'win11', 'checkin'), (e: CarryonError) => e.code === 'checkout-gone' && /carryon handback win11/.test(e.message) && /export/.test(e.message));
  assert.equal((await status(env(home), 'win11'))[0]!.desktop, 'win11', 'the work is kept');

  const back = await upload(env(home), 'win11', 'handback');
  assert.deepEqual(await status(env(home)), [], 'the local copy goes once the work is on the server');
  assert.ok((await serverDisk('win11')).equals(before), 'the current version is unchanged');
  const points = (await http.call('GET', '/v1/desktops/win11/restore-points', undefined, admin)).body.restorePoints as { id: string; kind: string; current: boolean }[];
  assert.deepEqual(points.filter((p) => p.id === back.snapshotId).map((p) => [p.kind, p.current]), [['handback', false]]);
  assert.ok((await broker.ctx.meta.listEvents({ limit: 10_000 })).some((e) => e.action === 'handback' && e.outcome === 'ok' && e.detail?.includes(back.snapshotId)));
  // Once per check-out.
  const alice = await http.login('alice', 'alice-password');
  const again = await http.call('POST', `/v1/checkouts/${held[0]!.id}/handback`, {}, alice);
  assert.deepEqual([again.status, again.body.error, again.body.snapshotId], [409, 'already-handed-back', back.snapshotId]);
  const r = await http.call('POST', '/v1/desktops/win11/restore', { snapshotId: back.snapshotId, reason: 'work handed back after a force-unlock' }, admin);
  assert.equal(r.status, 200, JSON.stringify(r.body));
  assert.ok((await serverDisk('win11')).equals(laptopDisk), 'restored: the handed-back work is current');
});

test('zeroes written and ranges discarded by the guest come back on check-in (the top holds them as zero clusters, not data)', async () => {
  const home = join(broker.dir, 'laptop');
  const before = await serverDisk('ubuntu');
  await checkout(env(home), 'ubuntu');
  const served = await serveDesktop(env(home), 'ubuntu');
  try {
    const uri = `nbd+unix:///disk0?socket=${served.socketPath}`;
    const M = 1024 * 1024;
    await execFileP('qemu-io', ['-f', 'raw', '-c', `write -z ${2 * M} ${CHUNK}`, '-c', `write -z ${3 * M + 4096} 8k`, '-c', `discard ${5 * M} ${CHUNK}`, '-c', `write -P 0xab ${7 * M + 512} 1k`, '-c', 'flush', uri]);
  } finally {
    await served.close();
  }
  const laptopDisk = await readDesktop(env(home), 'ubuntu');
  const M = 1024 * 1024;
  assert.ok(!isZero(before.subarray(2 * M, 2 * M + CHUNK)) && !isZero(before.subarray(3 * M + 4096, 3 * M + 12288)), 'the checkpoint had data where zeroes were written');
  assert.ok(isZero(laptopDisk.subarray(2 * M, 2 * M + CHUNK)) && isZero(laptopDisk.subarray(3 * M + 4096, 3 * M + 12288)), 'the laptop reads zeroes there now');
  const ci = await upload(env(home), 'ubuntu', 'checkin');
  assert.ok(ci.changedChunks >= 3, `${ci.changedChunks} changed chunks`);
  assert.ok((await serverDisk('ubuntu')).equals(laptopDisk), 'server snapshot re-assembles byte-identical');
});

test('cancel a check-out in flight', async () => {
  const home = join(broker.dir, 'laptop2');
  await http.call('POST', '/v1/admin/users', { name: 'bob', password: 'bob-password' }, admin);
  await http.call('POST', '/v1/admin/entitlements', { principalType: 'user', principal: 'bob', targetType: 'desktop', target: 'win11' }, admin);
  const bob: ClientEnv = { home, user: 'bob', password: async () => 'bob-password', log: () => undefined, pollMs: 20 };
  await enroll(bob, broker.url, { fingerprint: broker.fingerprint, name: 'laptop2' });
  const abort = new AbortController();
  await assert.rejects(checkout({ ...bob, signal: abort.signal, onProgress: (_l, p) => p.chunksDone >= 5 && abort.abort() }, 'win11'));
  const held = await http.call('GET', '/v1/admin/checkouts', undefined, admin);
  assert.equal((held.body.checkouts as { state: string }[])[0]!.state, 'transferring');
  await release(bob, 'win11', 'cancel');
  assert.equal(((await http.call('GET', '/v1/admin/checkouts', undefined, admin)).body.checkouts as unknown[]).length, 0);
});
