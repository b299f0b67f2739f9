import assert from 'node:assert/strict';
import { cpSync, readdirSync, readFileSync, rmSync, statfsSync, writeFileSync } from 'node:fs';
import { CarryonError } from '../../src/core/errors.js';
import { randomBytes } from 'node:crypto';
import { execFile, spawn } from 'node:child_process';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { isZero } from '../../src/core/chunks/chunking.js';
import { after, before, test } from 'node:test';
import { checkout, enroll, exportDisk, loginOnline, release, status, upload, type ClientEnv } from '../../src/client/ops.js';
import { moveTrustedClock, readDesktop, writeDesktop } from '../support/laptop.js';
import { serveDesktop } from '../../src/client/ops/serve.js';
import type { RunningBroker } from '../../src/broker/start.js';
import type { CollectableStore } from '../../src/store/chunk-store.js';
import { exportCurrentSnapshot } from '../../src/broker/desktops/snapshot-image.js';
import { ADMIN, api, cleanup, makeImage, testBroker, type Api } from '../broker/harness.js';
import { withTmpfs } from '../support/tmpfs.js';
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

async function serverDisk(desktop: string): Promise<Buffer> {
  const out = join(broker.dir, `export-${randomBytes(4).toString('hex')}.raw`);
  await exportCurrentSnapshot(broker.ctx, desktop, out);
  return readFileSync(out);
}

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

test('disk full during check-out: a clear error, nothing lost, the rerun completes', async (t) => {
  // The laptop's home on a small tmpfs that a "filler" file runs out of space mid-transfer.
  const mnt = join(broker.dir, 'small-disk');
  await withTmpfs(t, mnt, '48m', async () => {
    const home = join(mnt, 'home');
    await http.call('POST', '/v1/admin/users', { name: 'carol', password: 'carol-password' }, admin);
    await http.call('POST', '/v1/admin/entitlements', { principalType: 'user', principal: 'carol', targetType: 'desktop', target: 'ubuntu' }, admin);
    const carol: ClientEnv = { home, user: 'carol', password: async () => 'carol-password', log: () => undefined, pollMs: 20 };
    await enroll(carol, broker.url, { fingerprint: broker.fingerprint, name: 'small-laptop' });
    const filler = join(mnt, 'filler');
    let filled = false;
    const fill = () => {
      if (filled) return;
      filled = true;
      const free = statfsSync(mnt).bavail * statfsSync(mnt).bsize;
      writeFileSync(filler, Buffer.alloc(Math.max(0, free - 64 * 1024)));
    };
    await assert.rejects(checkout({ ...carol, onProgress: fill }, 'ubuntu'), (e: unknown) => e instanceof CarryonError && e.code === 'disk-full' && /run `carryon checkout` again/.test(e.message));
    const [st] = await status(carol, 'ubuntu');
    assert.equal(st!.state, 'transferring', 'the vault still knows the check-out in flight');
    rmSync(filler);
    const done = await checkout(carol, 'ubuntu');
    assert.ok(done.bytesMoved > 0);
    const [after] = await status(carol, 'ubuntu');
    assert.deepEqual([after!.state, after!.safeOffline], ['checked_out', true]);
    const disk = await readDesktop(carol, 'ubuntu');
    assert.ok(disk.equals(await serverDisk('ubuntu')), 'byte-identical after the interrupted check-out');
    await release(carol, 'ubuntu', 'rollback');
  });
});

test('4 MiB chunks (larger than any qcow2 cluster): the base writer steps aside and the check-out goes through the storage daemon, byte for byte', async () => {
  const image = makeImage(broker.dir, 32);
  const r = await http.call('POST', '/v1/admin/desktops', { name: 'bigchunks', image, chunkSize: 4 * 1024 * 1024, config: { vcpus: 1, ramMiB: 512, minRamMiB: 256 } }, admin);
  assert.equal(r.status, 201, JSON.stringify(r.body));
  await http.call('POST', '/v1/admin/entitlements', { principalType: 'user', principal: 'alice', targetType: 'desktop', target: 'bigchunks' }, admin);
  const home = join(broker.dir, 'laptop-bigchunks');
  await enroll(env(home), broker.url, { fingerprint: broker.fingerprint, name: 'laptop-bigchunks' });
  logs.length = 0;
  const co = await checkout(env(home), 'bigchunks');
  assert.ok(co.bytesMoved > 0);
  assert.ok(logs.some((l) => /writing through QEMU: .*cluster size/.test(l)), logs.join('\n'));
  const [st] = await status(env(home), 'bigchunks');
  assert.deepEqual([st!.state, st!.safeOffline], ['checked_out', true]);
  assert.ok((await readDesktop(env(home), 'bigchunks')).equals(await serverDisk('bigchunks')), 'byte-identical through the daemon');
  await release(env(home), 'bigchunks', 'rollback');
});

/** Chunk indexes recorded durable in every `filled.json` under `home` (fill-direct.ts). */
function filledCount(home: string): number {
  const walk = (dir: string): string[] => readdirSync(dir, { withFileTypes: true }).flatMap((e) => (e.isDirectory() ? walk(join(dir, e.name)) : e.name === 'filled.json' ? [join(dir, e.name)] : []));
  return walk(home).reduce((n, f) => n + (JSON.parse(readFileSync(f, 'utf8')) as { chunks: number[] }).chunks.length, 0);
}

const chunksOut = () => [...broker.transfer!.stats.perJob.values()].reduce((n, j) => n + j.chunksOut, 0);

test('kill -9 of a check-out at ten points (three fixed, seven at random chunk counts): what was made durable stays, each rerun fetches only the rest, the disk is byte-identical', async (t) => {
  const image = makeImage(broker.dir, 128, 'resume.raw');
  const r = await http.call('POST', '/v1/admin/desktops', { name: 'resume', image, config: { vcpus: 1, ramMiB: 512, minRamMiB: 256 } }, admin);
  assert.equal(r.status, 201, JSON.stringify(r.body));
  await http.call('POST', '/v1/admin/entitlements', { principalType: 'user', principal: 'alice', targetType: 'desktop', target: 'resume' }, admin);
  const home = join(broker.dir, 'laptop-resume');
  await enroll(env(home), broker.url, { fingerprint: broker.fingerprint, name: 'laptop-resume' });
  const total = 256; // 128 MiB, every other 256 KiB chunk random (makeImage)
  const child = new URL('../support/checkout-child.js', import.meta.url).pathname;
  let durable = 0;
  // A real SIGKILL, sent by the child to itself (fill-direct.ts's test hooks) while other writes are in flight:
  // once this many chunks are recorded durable (a group made durable mid-transfer, not only at a clean stop),
  // or once this many chunks of the run arrived (whatever was durable by then).
  // The third waits for this run's first durable group (an absolute 90 was sometimes passed by one final group under load: 128 of 128).
  // Seven more at random chunk counts (1–16 chunks into a run) on the SQLite pass: the resume logic is
  // the laptop's; the diagnostics name the counts, so a failure can be replayed.
  const randomPoints = process.env.CARRYON_TEST_DATABASE === 'postgres' ? [] : Array.from({ length: 7 }, () => String(1 + Math.floor(Math.random() * 16)));
  t.diagnostic(`random kill points (chunks into a run): ${randomPoints.join(' ') || 'none on this pass'}`);
  const points = [
    () => ({ CARRYON_TEST_SIGKILL_AFTER_FILLED: '35' }),
    () => ({ CARRYON_TEST_SIGKILL_AFTER_CHUNKS: '30' }),
    ...randomPoints.map((n) => () => ({ CARRYON_TEST_SIGKILL_AFTER_CHUNKS: n })),
    () => ({ CARRYON_TEST_SIGKILL_AFTER_FILLED: String(durable + 1) }),
  ];
  for (const pointAt of points) {
    const point: Record<string, string> = pointAt();
    const wireBefore = chunksOut();
    const ended = await new Promise<{ code: number | null; signal: NodeJS.Signals | null; stderr: string }>((resolve, reject) => {
      const p = spawn(process.execPath, [child, home, 'alice', 'alice-password', 'resume'], { env: { ...process.env, ...point }, stdio: ['ignore', 'ignore', 'pipe'] });
      let stderr = '';
      p.stderr.setEncoding('utf8').on('data', (s: string) => (stderr += s));
      p.once('error', reject);
      p.once('close', (code, signal) => resolve({ code, signal, stderr }));
    });
    assert.equal(ended.signal, 'SIGKILL', `killed at ${JSON.stringify(point)} (${durable} durable before): exit ${ended.code}, ${filledCount(home)} durable now\n${ended.stderr}`);
    const now = filledCount(home);
    const want = Number(Object.values(point)[0]);
    if ('CARRYON_TEST_SIGKILL_AFTER_FILLED' in point) assert.ok(now >= want && now < total, `killed mid-transfer with ${want}+ chunks durable: ${now} of ${total}`);
    else assert.ok(now >= durable && now < durable + want + 32, `what was durable stays (${durable} → ${now})`);
    assert.ok(chunksOut() - wireBefore >= now - durable, 'nothing counted that did not travel');
    durable = now;
  }
  // The job's own counters go with the job when the check-out ends: the rerun is counted in bytes on the wire (random chunks: 256 KiB each and a few bytes).
  const bytesBefore = broker.transfer!.stats.bytesOut;
  const done = await checkout(env(home), 'resume');
  const missing = total - durable;
  assert.equal(done.chunksMoved, missing, `the rerun fetches only the ${missing} chunks not yet durable`);
  const wire = broker.transfer!.stats.bytesOut - bytesBefore;
  // Each chunk is 256 KiB and its envelope and frame (measured ≈ 1.8 KiB): a bound per chunk, not one spare chunk in all (153 missing chunks outgrew that).
  assert.ok(wire >= missing * CHUNK && wire < missing * (CHUNK + 4096), `${wire} bytes on the wire for ${missing} chunks`);
  assert.ok((await readDesktop(env(home), 'resume')).equals(await serverDisk('resume')), `byte-identical after ${points.length} kills`);
  await release(env(home), 'resume', 'rollback');
});

test('--limit-rate holds for the download `serve` takes over (remembered from the check-out), and a policy bound caps a user who asks for more', async () => {
  const cap = 1024 * 1024;
  const image = makeImage(broker.dir, 8, 'rate.raw'); // 16 random chunks of 256 KiB: 4 MiB to move
  for (const name of ['rate', 'rate-bound']) {
    const r = await http.call('POST', '/v1/admin/desktops', { name, image, config: { vcpus: 1, ramMiB: 512, minRamMiB: 256 } }, admin);
    assert.equal(r.status, 201, JSON.stringify(r.body));
    await http.call('POST', '/v1/admin/entitlements', { principalType: 'user', principal: 'alice', targetType: 'desktop', target: name }, admin);
  }
  const home = join(broker.dir, 'laptop-rate');
  await enroll(env(home), broker.url, { fingerprint: broker.fingerprint, name: 'laptop-rate' });
  // The check-out under --limit-rate stops after 2 chunks; `serve` (no --limit-rate of its own) continues the download.
  const abort = new AbortController();
  await assert.rejects(checkout({ ...env(home), rateLimit: new RateLimiter(cap), signal: abort.signal, onProgress: (_l, p) => p.chunksDone >= 2 && abort.abort() }, 'rate'));
  const bytesBefore = broker.transfer!.stats.bytesOut;
  const started = performance.now();
  const served = await serveDesktop(env(home), 'rate');
  try {
    while ((await status(env(home), 'rate'))[0]!.state !== 'checked_out') await new Promise((r) => setTimeout(r, 50));
  } finally {
    await served.close();
  }
  const secs = (performance.now() - started) / 1000;
  const moved = broker.transfer!.stats.bytesOut - bytesBefore;
  // A lower bound only: the bucket allows a one-second burst, the rest goes at the cap at most.
  assert.ok(moved > 2 * CHUNK, `serve moved the rest (${moved} bytes)`);
  assert.ok(secs >= ((moved - cap) / cap) * 0.8, `${moved} bytes in ${secs.toFixed(2)} s: the remembered ${cap} B/s held`);
  // The base `serve` completed is whole and not taken for damaged (its file was read under QEMU's unflushed tables before).
  const [st] = await status(env(home), 'rate');
  assert.deepEqual([st!.problem, st!.safeOffline], [null, true]);
  assert.ok((await readDesktop(env(home), 'rate')).equals(await serverDisk('rate')), 'the continued check-out is byte-identical to the snapshot');
  await release(env(home), 'rate', 'rollback');

  // The administrator's bound: a user asking for 100 MiB/s gets 1024 KiB/s (timed from the first chunk to the last: no fixed costs).
  await http.call('PUT', '/v1/admin/policies/desktop/rate-bound', { maxTransferRateKBps: 1024 }, admin);
  let first: { at: number; bytes: number } | null = null;
  let last = { at: 0, bytes: 0 };
  await checkout({ ...env(home), rateLimit: new RateLimiter(100 * cap), onProgress: (_l, p) => {
    last = { at: performance.now(), bytes: p.bytesDone };
    first ??= last;
  } }, 'rate-bound');
  const span = (last.at - first!.at) / 1000;
  const bytes = last.bytes - first!.bytes;
  assert.ok(bytes > 2 * cap && span >= ((bytes - cap) / cap) * 0.8, `${bytes} bytes in ${span.toFixed(2)} s under the policy's 1024 KiB/s`);
  await release(env(home), 'rate-bound', 'rollback');
});
