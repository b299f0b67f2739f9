import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { execFile } from 'node:child_process';
import { closeSync, mkdtempSync, openSync, readdirSync, readFileSync, readSync, writeFileSync, writeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { promisify } from 'node:util';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { checkout, enroll, release, status, upload, type ClientEnv } from '../../src/client/ops.js';
import { decodeManifest } from '../../src/core/chunks/manifest.js';
import type { RunningBroker } from '../../src/broker/start.js';
import { ADMIN, api, cleanup, makeImage, testBroker, type Api } from '../broker/harness.js';
import { readDesktop, writeDesktop } from '../support/laptop.js';

process.env.CARRYON_SCRYPT_N = '1024';
const CHUNK = 256 * 1024;
let broker: RunningBroker & { dir: string };
let http: Api;
let admin: string;
let image: string;

const env = (home: string): ClientEnv => ({ home: join(broker.dir, home), user: 'alice', password: async () => 'alice-password', log: () => undefined, pollMs: 20 });

before(async () => {
  const dir = mkdtempSync(join(tmpdir(), 'carryon-broker-'));
  // Local packs on every engine: this test flips a byte inside a pack file.
  broker = await testBroker(dir, { chunkStore: join(dir, 'chunks') });
  http = api(broker.url, broker.fingerprint);
  admin = await http.login(ADMIN.name, ADMIN.password);
  await http.call('POST', '/v1/admin/users', { name: 'alice', password: 'alice-password' }, admin);
  image = makeImage(broker.dir, 2);
  assert.equal((await http.call('POST', '/v1/admin/desktops', { name: 'fragile', image, config: { vcpus: 1, ramMiB: 512, minRamMiB: 256 } }, admin)).status, 201);
  await http.call('POST', '/v1/admin/entitlements', { principalType: 'user', principal: 'alice', targetType: 'desktop', target: 'fragile' }, admin);
});
after(async () => {
  await http.close();
  await broker.close();
  cleanup(broker.dir);
});

const run = promisify(execFile);
/** `carryon admin …` as the broker's admin; its stdout. */
async function admin_(...args: string[]): Promise<string> {
  const env = { ...process.env, CARRYON_URL: broker.url, CARRYON_FINGERPRINT: broker.fingerprint, CARRYON_USER: ADMIN.name, CARRYON_PASSWORD: ADMIN.password };
  return (await run(process.execPath, [join(process.cwd(), 'dist', 'src', 'cli', 'main.js'), 'admin', ...args], { env })).stdout;
}

/** Flips one byte in the middle of a chunk's record in whichever pack file holds it. */
async function flipByteOf(chunkId: string): Promise<void> {
  const blob = (await broker.ctx.store.get(chunkId))!;
  const dir = join(broker.dir, 'chunks', 'packs');
  for (const name of readdirSync(dir)) {
    const at = readFileSync(join(dir, name)).indexOf(blob.subarray(0, 64));
    if (at < 0) continue;
    const fd = openSync(join(dir, name), 'r+');
    const b = Buffer.alloc(1);
    readSync(fd, b, 0, 1, at + (blob.length >> 1));
    b[0]! ^= 0x01;
    writeSync(fd, b, 0, 1, at + (blob.length >> 1));
    closeSync(fd);
    return;
  }
  throw new Error(`chunk ${chunkId} not found in any pack`);
}

test('a flipped byte in the store: the check-out fails with an audited, clear error; status says so; the snapshot is refused afterwards, naming the newest intact restore point', async (t) => {
  // Laptop A makes a second version whose first chunk exists nowhere else; then that chunk rots in the store.
  await enroll(env('a'), broker.url, { fingerprint: broker.fingerprint, name: 'a' });
  await checkout(env('a'), 'fragile');
  await writeDesktop(env('a'), 'fragile', [{ offset: 0, data: randomBytes(CHUNK) }]);
  const ci = await upload(env('a'), 'fragile', 'checkin');
  const imported = ((await http.call('GET', '/v1/desktops/fragile/restore-points', undefined, admin)).body.restorePoints as { id: string; kind: string }[]).find((r) => r.kind === 'import')!;
  const snap = (await broker.ctx.meta.getSnapshot(ci.snapshotId))!;
  const manifest = decodeManifest((await broker.ctx.store.getManifest(snap.disks[0]!.digest))!);
  const rotten = manifest.chunks[0]!;
  assert.ok(rotten, 'chunk 0 holds data');
  await flipByteOf(rotten);

  // Laptop B checks it out: the chunk never authenticates.
  await enroll(env('b'), broker.url, { fingerprint: broker.fingerprint, name: 'b' });
  const restoreHint = new RegExp(`newest intact restore point is ${imported.id} \\(import,`);
  await assert.rejects(checkout(env('b'), 'fragile'), (e: Error & { code?: string }) => (t.diagnostic(e.message), e.code === 'damaged-snapshot')
    && /check-out of fragile failed: damaged snapshot — chunk \S+ failed authentication 3 times/.test(e.message) && restoreHint.test(e.message) && /carryon cancel fragile/.test(e.message));
  const events = await broker.ctx.meta.listEvents({ limit: 10_000 });
  const audited = events.find((e) => e.action === 'checkout-damaged');
  assert.equal(audited?.outcome, 'failed');
  assert.match(audited?.detail ?? '', new RegExp(`the store's copy fails too .*snapshot ${ci.snapshotId} is damaged`));
  // A rerun fails the same way at once (nothing fetched), and the admin view says why the check-out stopped.
  await assert.rejects(checkout(env('b'), 'fragile'), (e: Error & { code?: string }) => e.code === 'damaged-snapshot' && restoreHint.test(e.message));
  const held = (await http.call('GET', '/v1/admin/checkouts', undefined, admin)).body.checkouts as { failure: string | null }[];
  assert.equal(held[0]!.failure, 'damaged snapshot');
  const [st] = await status(env('b'), 'fragile');
  assert.deepEqual([st!.state, st!.safeOffline], ['failed: damaged snapshot', false]);
  assert.match(st!.problem ?? '', /damaged snapshot/);

  // The broker no longer hands that snapshot out, and says which restore point is intact.
  await release(env('b'), 'fragile', 'cancel');
  await assert.rejects(checkout(env('b'), 'fragile'), (e: Error & { code?: string }) => (t.diagnostic(e.message), e.code === 'snapshot-damaged') && /fragile's snapshot \S+ is damaged/.test(e.message) && restoreHint.test(e.message));
  assert.ok((await broker.ctx.meta.listEvents({ limit: 10_000 })).some((e) => e.action === 'checkout' && e.outcome === 'denied' && /snapshot-damaged/.test(e.detail ?? '')));

  // `admin verify` alone is enough to stop it being handed out (the laptop's report forgotten).
  await broker.ctx.meta.setSetting('store.damaged-chunks', '{}');
  const report = (await http.call('POST', '/v1/admin/verify', {}, admin)).body.report as { damagedSnapshots: { id: string }[] };
  assert.ok(report.damagedSnapshots.some((s) => s.id === ci.snapshotId));
  await assert.rejects(checkout(env('b'), 'fragile'), (e: Error & { code?: string }) => e.code === 'snapshot-damaged' && restoreHint.test(e.message));

  // The restore point it names checks out whole.
  assert.equal((await http.call('POST', '/v1/desktops/fragile/restore', { snapshotId: imported.id, reason: 'damaged' }, admin)).status, 200);
  await checkout(env('b'), 'fragile');
  const laptopDisk = await readDesktop(env('b'), 'fragile');
  assert.ok(laptopDisk.equals(readFileSync(image)), 'the intact restore point, byte for byte');

  // A laptop's word alone marks nothing: an intact chunk is checked and left alone; one outside its snapshot is refused.
  const alice = await http.login('alice', 'alice-password');
  const mine = ((await http.call('GET', '/v1/admin/checkouts', undefined, admin)).body.checkouts as { id: string; snapshotId: string }[])[0]!;
  const restored = (await broker.ctx.meta.getSnapshot(mine.snapshotId))!;
  const intact = decodeManifest((await broker.ctx.store.getManifest(restored.disks[0]!.digest))!).chunks[0]!;
  const lie = await http.call('POST', `/v1/checkouts/${mine.id}/damaged`, { chunkId: intact, detail: 'forged' }, alice);
  assert.deepEqual([lie.status, lie.body.damaged, lie.body.message], [200, false, null]);
  assert.ok((await broker.ctx.meta.listEvents({ limit: 10_000 })).some((e) => e.action === 'checkout-chunk-failure' && /the store's copy authenticates/.test(e.detail ?? '')));
  const outside = await http.call('POST', `/v1/checkouts/${mine.id}/damaged`, { chunkId: rotten, detail: 'not mine' }, alice);
  assert.deepEqual([outside.status, outside.body.error], [400, 'not-in-snapshot']);

  shared = { laptopDisk, imported: imported.id, damaged: ci.snapshotId };
});

/** What the damage test leaves for the export test: the laptop's disk (the intact restore point made current). */
let shared: { laptopDisk: Buffer; imported: string; damaged: string } | null = null;

test('admin desktops export: raw and qcow2 (a chosen restore point) equal the laptop\'s disk under qemu-img compare; a damaged snapshot is refused; audited; the qcow2 re-imports byte for byte', async () => {
  assert.ok(shared, 'runs after the damage test');
  const { laptopDisk, imported, damaged } = shared;
  // Export (admin CLI): the current version raw and a chosen restore point as qcow2 equal the laptop's disk (qemu-img compare);
  // the damaged snapshot is refused; the qcow2 re-imports byte for byte.
  const laptopFile = join(broker.dir, 'laptop.raw');
  writeFileSync(laptopFile, laptopDisk);
  const raw = join(broker.dir, 'export.raw');
  const qcow2 = join(broker.dir, 'export.qcow2');
  assert.match(await admin_('desktops', 'export', 'fragile', raw, '--quiet'), /^wrote \S+export\.raw \(raw, 2\.0 MiB\): fragile disk disk0, snapshot [0-9a-f-]{36}\n$/);
  await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', laptopFile, raw]);
  await admin_('desktops', 'export', 'fragile', qcow2, '--format', 'qcow2', '--snapshot', imported, '--quiet');
  await run('qemu-img', ['compare', '-f', 'raw', '-F', 'qcow2', laptopFile, qcow2]);
  const refused = await admin_('desktops', 'export', 'fragile', join(broker.dir, 'bad.raw'), '--snapshot', damaged).catch((e: { stderr: string }) => e.stderr);
  assert.match(refused, /is damaged in the datacenter's store.*\[snapshot-damaged\]/);
  assert.equal(readdirSync(broker.dir).filter((f) => f.startsWith('bad.raw')).length, 0, 'nothing left behind by a refused export');
  const exports = (await broker.ctx.meta.listEvents({ limit: 10_000 })).filter((e) => e.action === 'export');
  assert.deepEqual(exports.map((e) => `${e.outcome} ${(e.detail ?? '').split(':')[0]}`), ['ok started', 'ok done', 'ok started', 'ok done', 'denied snapshot-damaged']);
  await admin_('desktops', 'create', 'fragile-copy', qcow2, '--quiet');
  const again = join(broker.dir, 'again.raw');
  await admin_('desktops', 'export', 'fragile-copy', again, '--quiet');
  assert.ok(readFileSync(again).equals(laptopDisk), 'the exported qcow2 re-imports byte for byte');
});

test('carryon restore: a user lists restore points and restores one where policy restoreAllowed lets them; a damaged one is refused; audited', async () => {
  assert.ok(shared, 'runs after the damage test');
  const cli = (args: string[]) => run(process.execPath, [join(process.cwd(), 'dist', 'src', 'cli', 'main.js'), ...args],
    { env: { ...process.env, CARRYON_HOME: join(broker.dir, 'b'), CARRYON_USER: 'alice', CARRYON_PASSWORD: 'alice-password' } });
  const refusal = (args: string[]) => cli(args).then(() => 'not refused', (e: { stderr: string }) => e.stderr);
  await release(env('b'), 'fragile', 'rollback');
  assert.match(await refusal(['restore', 'fragile', shared.imported]), /policy \(the default\) does not let users restore fragile \[policy-denied\]/);
  assert.match((await cli(['restore', 'fragile'])).stdout, /cannot restore now: policy \(the default\)/);
  await http.call('PATCH', '/v1/admin/policies/desktop/fragile', { restoreAllowed: true }, admin);
  const listed = JSON.parse((await cli(['restore', 'fragile', '--json'])).stdout) as { canRestore: boolean; restorePoints: { id: string; kind: string }[] };
  assert.equal(listed.canRestore, true);
  assert.ok(listed.restorePoints.some((p) => p.id === shared!.damaged));
  assert.match(await refusal(['restore', 'fragile', shared.damaged]), /is damaged in the datacenter's store.*\[snapshot-damaged\]/);
  assert.match((await cli(['restore', 'fragile', shared.imported, '--reason', 'back to the import'])).stdout, new RegExp(`^fragile restored from ${shared.imported}; \`carryon checkout fragile\` starts from it`));
  const events = (await broker.ctx.meta.listEvents({ limit: 10_000 })).filter((e) => e.action === 'restore' && e.actor === 'alice');
  assert.deepEqual(events.map((e) => e.outcome), ['denied', 'denied', 'ok']);
});
