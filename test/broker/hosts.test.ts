import assert from 'node:assert/strict';
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync, mkdtempSync, readdirSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { createConnection } from 'node:net';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { promisify } from 'node:util';
import { after, before, test } from 'node:test';
import { request } from 'undici';
import { generateSigningKey, publicKeyToBase64 } from '../../src/core/signing.js';
import { unwrapLineageKeys } from '../../src/core/keys.js';
import { openBlob } from '../../src/core/chunks/blob.js';
import { decodeManifest } from '../../src/core/chunks/manifest.js';
import type { ChunkId } from '../../src/core/chunk-id.js';
import { convertChain } from '../../src/disk/chain.js';
import { hostChain } from '../../src/host/keys.js';
import { startHost, type RunningHost } from '../../src/host/service.js';
import { importImage } from '../../src/import/import.js';
import { pinnedAgent } from '../../src/net/pinned-agent.js';
import { BrokerUnreachable } from '../../src/net/failover.js';
import { checkout as laptopCheckout, enroll, upload, type ClientEnv } from '../../src/client/ops.js';
import { addChain, StorageDaemon } from '../../src/disk/storage-daemon.js';
import { NbdClient } from '../../src/nbd/client.js';
import type { Chain } from '../../src/disk/chain.js';
import { readDesktop, writeDesktop } from '../support/laptop.js';
import { ADMIN, api, cleanup, hostCredential, makeImage, testBroker, type Api, type TestBroker } from './harness.js';

process.env.CARRYON_SCRYPT_N = '1024';

/**
 * Desktop hosts (issue 26 items 1–2): a host registers with its own credential, runs a desktop under QEMU
 * (paused: `-S`, no guest code runs, the chain is opened) from a chain it fills with the transfer
 * protocol; power operations and check-outs refuse each other; a host killed with -9 is marked.
 */
const main = join(process.cwd(), 'dist', 'src', 'cli', 'main.js');
let broker: TestBroker;
let http: Api;
let admin: string;
let alice: string;
let aliceDevice: string;
let host: RunningHost | null = null;
/** h1's data directory (the host the power and handover tests share). */
let h1Dir = '';
let child: ChildProcess | null = null;
const qemus: number[] = [];
const dirs: string[] = [];
const laptop = { cpus: 8, ramBytes: 16 * 2 ** 30, freeDiskBytes: 100 * 2 ** 30 };

before(async () => {
  broker = await testBroker();
  http = api(broker.url, broker.fingerprint);
  admin = await http.login(ADMIN.name, ADMIN.password);
  assert.equal((await http.call('POST', '/v1/admin/users', { name: 'alice', password: 'alice-password' }, admin)).status, 201);
  for (const name of ['online1', 'online2']) {
    const created = await http.call('POST', '/v1/admin/desktops', { name, image: makeImage(broker.dir, 4, `${name}.raw`), config: { vcpus: 1, ramMiB: 256, minRamMiB: 128, nic: 'none' } }, admin);
    assert.equal(created.status, 201, JSON.stringify(created.body));
    assert.equal((await http.call('POST', '/v1/admin/entitlements', { principalType: 'user', principal: 'alice', targetType: 'desktop', target: name }, admin)).status, 201);
  }
  alice = await http.login('alice', 'alice-password');
  const dev = await http.call('POST', '/v1/devices', { name: 'laptop', publicKey: publicKeyToBase64(generateSigningKey().publicKey), host: laptop }, alice);
  aliceDevice = String(dev.body.deviceId);
});
after(async () => {
  await host?.close();
  if (child?.exitCode === null) child.kill('SIGKILL');
  for (const pid of qemus) {
    try {
      process.kill(pid, 'SIGKILL');
    } catch {
      // already gone
    }
  }
  await http.close();
  await broker.close();
  cleanup(broker.dir);
  for (const d of dirs) cleanup(d);
});

/** A host's call, with the credential of the host its path (or its body's `id`) names unless `withSecret` is given. */
const hostCall = async (path: string, body: unknown, withSecret?: string) => {
  withSecret ??= await hostCredential(broker, /^\/v1\/hosts\/([^/]+)\//.exec(path)?.[1] ?? String((body as { id?: string }).id));
  const agent = pinnedAgent(broker.fingerprint);
  try {
    const res = await request(`${broker.url}${path}`, body === undefined ? { method: 'GET', dispatcher: agent, headers: { 'x-carryon-host-secret': withSecret } }
      : { method: 'POST', dispatcher: agent, headers: { 'content-type': 'application/json', 'x-carryon-host-secret': withSecret }, body: JSON.stringify(body) });
    return { status: res.statusCode, body: (await res.body.json()) as Record<string, unknown> };
  } finally {
    await agent.close();
  }
};
const power = (desktop: string, action: string, token = admin) => http.call('POST', `/v1/admin/desktops/${desktop}/power`, { action }, token);
const checkout = (desktop: string) => http.call('POST', `/v1/desktops/${desktop}/checkout`, { deviceId: aliceDevice, host: laptop }, alice);
const events = async (action: string) => ((await http.call('GET', `/v1/admin/audit?limit=10000&action=${action}`, undefined, admin)).body.events as { actor: string; outcome: string; detail: string | null }[]);
const desktopId = async (name: string) => (await broker.ctx.meta.getDesktop(name))!.id;
const placement = async (name: string) => broker.ctx.hosts.placement(await desktopId(name));
async function until<T>(what: string, probe: () => Promise<T | null | undefined | false>, ms = 60_000): Promise<T> {
  for (const end = Date.now() + ms; Date.now() < end; await new Promise((r) => setTimeout(r, 100))) {
    const v = await probe();
    if (v) return v;
  }
  throw new Error(`timed out waiting for ${what}`);
}
const placedAs = (name: string, state: string) => until(`${name} ${state}`, async () => ((await placement(name))?.state === state ? (await placement(name))! : null), 30_000);
const hostsList = async () => (await http.call('GET', '/v1/admin/hosts', undefined, admin)).body.hosts as { id: string; health: string; desktops: { desktopId: string; state: string; pid: number | null }[] }[];

const cli = (args: string[]) => promisify(execFile)(process.execPath, [main, ...args], { env: { ...process.env, CARRYON_URL: broker.url, CARRYON_FINGERPRINT: broker.fingerprint, CARRYON_USER: ADMIN.name, CARRYON_PASSWORD: ADMIN.password } })
  .then((r) => ({ code: 0, stdout: r.stdout, stderr: r.stderr }), (e: { code: number; stdout: string; stderr: string }) => ({ code: e.code, stdout: e.stdout, stderr: e.stderr }));

test('host credentials: each host its own (no shared host.secret); a missing, wrong, shared or transfer secret is refused (401, audited); a credential acts only for its own host on every host route (403, audited); revoke cuts the host off at once, its long poll too; `carryon host` says what to do', async () => {
  assert.equal(existsSync(join(broker.dir, 'host.secret')), false, 'the broker makes no shared host secret');
  // Too small for any desktop here: never chosen by the tests that follow.
  const reg = (id: string) => ({ id, vcpus: 1, ramMiB: 64, maxDesktops: 1, accel: 'tcg', heartbeatSec: 1 });
  // An admin makes k1's credential: shown once, alone on stdout; the broker keeps only a hash bound to k1.
  const added = await cli(['admin', 'hosts', 'add', 'k1']);
  assert.equal(added.code, 0, added.stderr);
  const k1 = added.stdout.trim();
  assert.match(k1, /^k1:[A-Za-z0-9_-]{43}$/);
  assert.match(added.stderr, /credential of desktop host k1 \(shown once\)/);
  assert.ok(!(await broker.ctx.hosts.keyHash('k1'))!.includes(k1.slice(3)));
  const twice = await http.call('POST', '/v1/admin/hosts', { id: 'k1' }, admin);
  assert.deepEqual([twice.status, twice.body.error], [409, 'host-exists']);
  const k2 = await hostCredential(broker, 'k2');

  const transferSecret = readFileSync(join(broker.dir, 'transfer.secret'), 'utf8').trim();
  const shared = randomBytes(24).toString('base64url'); // what the old shared host.secret held
  for (const wrong of ['', shared, transferSecret, `k1:${'x'.repeat(43)}`, `k3:${k1.slice(3)}`]) {
    const r = await hostCall('/v1/hosts/register', reg('k1'), wrong);
    assert.deepEqual([r.status, r.body.error], [401, 'bad-secret'], wrong);
  }
  assert.match(String((await hostCall('/v1/hosts/register', reg('k1'), shared)).body.message), /shared host\.secret is no longer accepted: `carryon admin hosts add ID`/);
  assert.ok((await events('host-register')).filter((e) => e.outcome === 'denied').length >= 5, 'each refusal audited');
  assert.equal((await hostCall('/v1/hosts/k1/heartbeat', {}, k1)).status, 404, 'known, not registered yet');
  assert.equal((await hostCall('/v1/hosts/register', reg('k1'), k1)).status, 200);
  assert.equal((await hostCall('/v1/hosts/register', reg('k2'), k2)).status, 200);

  // k2's own credential in k1's name, on every host route the broker has: refused before anything else.
  const routes = broker.routes.filter((r) => r.url.startsWith('/v1/hosts/') && r.method !== 'HEAD');
  assert.ok(routes.length >= 14, routes.map((r) => r.url).join(' '));
  for (const r of routes) {
    const path = r.url.replace(':id', 'k1').replace(/:[A-Za-z]+/g, 'x');
    const res = await hostCall(path, r.method === 'GET' ? undefined : r.url === '/v1/hosts/register' ? reg('k1') : {}, k2);
    assert.deepEqual([res.status, res.body.error], [403, 'other-host'], `${r.method} ${r.url}`);
  }
  assert.ok((await events('host-heartbeat')).some((e) => e.actor === 'host:k2' && e.outcome === 'denied' && /other-host: .* acts for host k1/.test(e.detail ?? '')), 'audited');
  assert.ok((await events('host-register')).some((e) => e.actor === 'host:k2' && e.outcome === 'denied' && /registering as host k1/.test(e.detail ?? '')), 'audited');

  // k1 is waiting for commands when an admin revokes it: the poll is answered 401 at once, and so is every later call.
  // The longest wait the route allows: only a revocation answers it before its end (the CLI's own start may take seconds on a loaded box).
  const pollStart = Date.now();
  const waiting = hostCall('/v1/hosts/k1/commands/wait', { waitMs: 25_000 }, k1);
  await new Promise((r) => setTimeout(r, 300));
  const revoked = await cli(['admin', 'hosts', 'revoke', 'k1']);
  assert.equal(revoked.code, 0, revoked.stderr);
  assert.match(revoked.stdout, /^host k1: credential revoked/);
  const woken = await waiting;
  assert.deepEqual([woken.status, woken.body.error], [401, 'bad-secret'], JSON.stringify(woken.body));
  assert.ok(Date.now() - pollStart < 23_000, 'not at the end of its wait');
  assert.deepEqual([(await hostCall('/v1/hosts/k1/heartbeat', {}, k1)).status], [401]);
  assert.equal((await hostsList()).find((h) => h.id === 'k1')!.health, 'lost');
  assert.ok((await events('host-revoke')).some((e) => e.actor === ADMIN.name && e.outcome === 'ok'), 'audited');
  assert.equal((await hostCall('/v1/hosts/k2/heartbeat', {}, k2)).status, 200, 'the other host is untouched');

  // `carryon host`: with the old shared secret it says what to do; with a revoked credential the broker refuses it; --id must be the credential's.
  const run = async (content: string, extra: string[] = []) => {
    const file = join(broker.dir, `try-${randomBytes(4).toString('hex')}.credential`);
    writeFileSync(file, `${content}\n`, { mode: 0o600 });
    return await cli(['host', '--broker', broker.url, '--broker-fingerprint', broker.fingerprint, '--secret-file', file, '--data-dir', join(broker.dir, 'host-x'), '--vcpus', '1', '--ram-mib', '512', '--max-desktops', '1', '--accel', 'tcg', ...extra]);
  };
  const old = await run(shared);
  assert.equal(old.code, 1);
  assert.match(old.stderr, /does not hold a host's own credential \(the broker's shared host\.secret is no longer accepted\): on the broker's side, `carryon admin hosts add <host id>`/);
  const gone = await run(k1);
  assert.equal(gone.code, 1);
  assert.match(gone.stderr, /carryon: host credential refused: .* \[bad-secret\]/);
  assert.match((await run(k2, ['--id', 'k1'])).stderr, /--id k1, but the credential is host k2's/);
  // Made again: the new credential works, the revoked one stays refused.
  const k1b = String((await http.call('POST', '/v1/admin/hosts', { id: 'k1' }, admin)).body.credential);
  assert.equal((await hostCall('/v1/hosts/register', reg('k1'), k1b)).status, 200);
  assert.equal((await hostCall('/v1/hosts/k1/heartbeat', {}, k1)).status, 401);
  for (const id of ['k1', 'k2']) assert.equal((await http.call('DELETE', `/v1/admin/hosts/${id}`, undefined, admin)).status, 200);
});

test('the host protocol: a host gets keys and a ticket only for a desktop placed on it and starting; a start asked twice gives the first job back; a failed start that kept nothing frees the desktop; an ack counts once', async () => {
  // Two hosts that only speak the protocol (no QEMU); `small` has no room for the desktop.
  for (const [id, ramMiB] of [['fake', 512], ['small', 128]] as const) {
    assert.equal((await hostCall('/v1/hosts/register', { id, vcpus: 2, ramMiB, maxDesktops: 1, accel: 'tcg', heartbeatSec: 1 })).status, 200);
  }
  const on = await power('online2', 'on');
  assert.deepEqual([on.status, on.body], [200, { state: 'starting', host: 'fake' }]);
  const id = await desktopId('online2');
  const foreign = await hostCall(`/v1/hosts/small/desktops/${id}/prepare`, {});
  assert.deepEqual([foreign.status, foreign.body.error], [409, 'not-starting']);
  assert.ok((await events('host-prepare')).some((e) => e.actor === 'host:small' && e.outcome === 'denied'), 'audited');
  const commands = (await hostCall('/v1/hosts/fake/heartbeat', {})).body.commands as { id: string; type: string; desktopId: string }[];
  assert.deepEqual(commands.map((c) => [c.type, c.desktopId]), [['start', id]]);
  const first = await hostCall(`/v1/hosts/fake/desktops/${id}/prepare`, {});
  const second = await hostCall(`/v1/hosts/fake/desktops/${id}/prepare`, {});
  assert.equal(second.status, 200, JSON.stringify(second.body));
  const jobOf = (r: { body: Record<string, unknown> }) => (r.body.job as { id: string }).id;
  assert.equal((await broker.ctx.scheduler.get(jobOf(first)))!.state, 'cancelled', 'the first job gave its slot back');
  assert.equal(((second.body.disks as unknown[]).length), 1);
  // Its ticket is renewed for this host only; no laptop session sees the job.
  assert.equal((await hostCall(`/v1/hosts/fake/jobs/${jobOf(second)}`, undefined)).status, 200);
  assert.equal((await hostCall(`/v1/hosts/small/jobs/${jobOf(second)}`, undefined)).status, 404);
  assert.equal((await http.call('GET', `/v1/jobs/${jobOf(second)}`, undefined, alice)).status, 404);
  const ack = (body: unknown) => hostCall(`/v1/hosts/fake/commands/${commands[0]!.id}`, body);
  assert.equal((await ack({ ok: false, message: 'test: no QEMU here', kept: false })).status, 200);
  assert.equal((await ack({ ok: true, message: 'again' })).status, 404, 'once');
  assert.equal(await placement('online2'), null, 'nothing of the guest on the host: the desktop is free again');
  assert.equal((await broker.ctx.scheduler.get(jobOf(second)))!.state, 'failed');
  assert.equal((await broker.ctx.meta.getDesktop('online2'))!.powerState, 'off');
});

test('power refused while the desktop is checked out to a laptop (who, since when; audited), for an admin and for an entitled user; a user needs policy onlineAllowed', async () => {
  const start = await http.call('POST', '/v1/desktops/online1/start', {}, alice);
  assert.deepEqual([start.status, start.body.error], [403, 'policy-denied'], JSON.stringify(start.body));
  assert.match(String(start.body.message), /policy \(the default\) does not allow running online1 online/);
  assert.equal((await http.call('PATCH', '/v1/admin/policies/desktop/online1', { onlineAllowed: true }, admin)).status, 200);
  const co = await checkout('online1');
  assert.equal(co.status, 201, JSON.stringify(co.body));
  for (const r of [await power('online1', 'on'), await power('online1', 'reset'), await http.call('POST', '/v1/desktops/online1/start', {}, alice), await http.call('POST', '/v1/desktops/online1/reset', {}, alice)]) {
    assert.deepEqual([r.status, r.body.error], [409, 'locked'], JSON.stringify(r.body));
    assert.match(String(r.body.message), /^online1 is checked out to alice \(device [0-9a-f-]+\) since \d{4}-\d\d-\d\dT.*; power operations wait for its check-in$/);
  }
  assert.equal((await events('power-on')).filter((e) => e.outcome === 'denied' && /locked: online1 is checked out to alice/.test(e.detail ?? '')).length, 2, 'admin and user refusals audited');
  assert.equal(await placement('online1'), null, 'nothing placed');
  assert.equal((await http.call('POST', `/v1/checkouts/${(co.body.checkout as { id: string }).id}/cancel`, {}, alice)).status, 200);
});

test('power on: the host pulls the chunks and starts QEMU on its chain; check-out offered while it runs and while its writes are kept; on again pulls nothing; release frees it', async () => {
  const dataDir = mkdtempSync(join(tmpdir(), 'carryon-host-'));
  dirs.push(dataDir);
  h1Dir = dataDir;
  host = await startHost({ id: 'h1', brokerUrl: broker.url, brokerFingerprint: broker.fingerprint, secret: await hostCredential(broker, 'h1'), dataDir, vcpus: 2, ramMiB: 1024, maxDesktops: 2, accel: 'tcg', heartbeatSec: 1, shutdownGraceSec: 1, pausedGuests: true });
  // A user where policy allows: started on the only host.
  const on = await http.call('POST', '/v1/desktops/online1/start', {}, alice);
  assert.deepEqual([on.status, on.body], [200, { state: 'starting', host: 'h1' }], JSON.stringify(on.body));
  await placedAs('online1', 'running');
  // The QEMU's pid comes with the host's next heartbeat.
  const listed = await until('pid reported', async () => (await hostsList()).find((h) => h.desktops[0]?.pid));
  assert.equal(listed.health, 'ok');
  const pid = listed.desktops[0]!.pid!;
  qemus.push(pid);
  // The host's QEMU runs on the host's own chain.
  assert.match(readFileSync(`/proc/${pid}/cmdline`, 'utf8'), new RegExp(`${dataDir}/desktops/${await desktopId('online1')}/disk0/top.qcow2`));
  // Its screen is a VNC server on a unix socket in a private directory (no TCP port): it greets in RFB.
  const vnc = readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0').find((a) => a.startsWith('unix:') && a.endsWith('vnc.sock'))!.slice(5);
  assert.equal(statSync(dirname(vnc)).mode & 0o077, 0);
  const greeting = await new Promise<string>((resolve, reject) => {
    const s = createConnection(vnc);
    s.once('data', (d: Buffer) => (resolve(d.toString('latin1')), s.destroy()));
    s.once('error', reject);
  });
  assert.match(greeting, /^RFB 003\.008\n/);
  const started = (await events('host-start')).filter((e) => e.outcome === 'ok');
  assert.match(started[0]!.detail ?? '', /running \(pid \d+, tcg\); [1-9]\d* chunks \/ [1-9]\d* bytes pulled/);
  assert.equal((await broker.ctx.meta.getDesktop('online1'))!.powerState, 'on');

  const actions = async () => ((await http.call('GET', '/v1/desktops', undefined, alice)).body.desktops as { name: string; actions: string[] }[]).find((d) => d.name === 'online1')!.actions;
  assert.deepEqual(await actions(), ['checkout', 'stop', 'open'], 'a check-out (the host hands it over) and its screen');
  assert.deepEqual([(await power('online1', 'on')).status, (await power('online1', 'on')).body.error], [409, 'already-running']);

  // `carryon power online1 reset` as the user: the host resets its guest, which stays running.
  const userReset = await http.call('POST', '/v1/desktops/online1/reset', {}, alice);
  assert.deepEqual([userReset.status, userReset.body], [200, { state: 'running', host: 'h1' }], JSON.stringify(userReset.body));
  // Shut down: the paused guest does not answer ACPI, so after the grace it is powered off (and says so).
  const stop = await http.call('POST', '/v1/desktops/online1/stop', {}, alice);
  assert.deepEqual([stop.status, stop.body.state], [200, 'stopping']);
  await placedAs('online1', 'stopped');
  assert.match((await events('host-shutdown'))[0]!.detail ?? '', /did not shut down within 1 s: powered off/);
  assert.deepEqual(await actions(), ['checkout', 'start']);

  // Again on the same host (it keeps the chain): no chunk travels.
  assert.equal((await power('online1', 'on')).status, 200);
  await placedAs('online1', 'running');
  assert.match((await events('host-start')).filter((e) => e.outcome === 'ok')[0]!.detail ?? '', /; 0 chunks \/ 0 bytes pulled/);
  qemus.push((await until('pid reported', async () => (await hostsList()).find((h) => h.desktops[0]?.pid && h.desktops[0].pid !== pid)))!.desktops[0]!.pid!);
  const reset = await power('online1', 'reset');
  assert.deepEqual([reset.status, reset.body.state], [200, 'running']);
  const release = await http.call('POST', '/v1/admin/desktops/online1/release', {}, admin);
  assert.deepEqual([release.status, release.body.error], [409, 'running'], 'not while it runs');
  assert.equal((await power('online1', 'off')).status, 200);
  await placedAs('online1', 'stopped');
  assert.equal((await broker.ctx.meta.getDesktop('online1'))!.powerState, 'off');
  assert.deepEqual((await http.call('POST', '/v1/admin/desktops/online1/release', { reason: 'test' }, admin)).body, { released: 'h1' });
  await until('discard acknowledged', async () => (await events('host-discard')).some((e) => e.outcome === 'ok'), 10_000);
  assert.deepEqual(await actions(), ['checkout', 'start']);
  const free = await checkout('online1');
  assert.equal(free.status, 201, JSON.stringify(free.body));
  assert.equal((await http.call('POST', `/v1/checkouts/${(free.body.checkout as { id: string }).id}/cancel`, {}, alice)).status, 200);

  // A newer snapshot (as a check-in makes): the kept base takes only what changed, and ends up exact.
  const d = (await broker.ctx.meta.getDesktop('online1'))!;
  const image = readFileSync(join(broker.dir, 'online1.raw'));
  const chunk = 256 * 1024;
  randomBytes(chunk).copy(image, 0); // data → other data
  randomBytes(chunk).copy(image, chunk); // hole → data
  image.fill(0, 2 * chunk, 3 * chunk); // data → hole
  const changed = join(broker.dir, 'online1-v2.raw');
  writeFileSync(changed, image);
  const keys = unwrapLineageKeys(broker.ctx.secrets.masterKey, (await broker.ctx.meta.getLineageKeys(d.lineageId))!, `lineage:${d.lineageId}`);
  const v2 = await importImage(changed, { store: broker.ctx.store, keys });
  const snap = await broker.ctx.meta.createSnapshot({ desktopId: d.id, parentId: d.currentSnapshot, kind: 'checkin', disks: [{ name: 'disk0', digest: v2.digest, sizeBytes: v2.manifest.diskSize, chunkSize: v2.manifest.chunkSize }] });
  await broker.ctx.meta.setDesktopSnapshot(d.id, snap);
  assert.equal((await power('online1', 'on')).status, 200);
  await placedAs('online1', 'running');
  assert.match((await events('host-start')).filter((e) => e.outcome === 'ok')[0]!.detail ?? '', /; 2 chunks \/ \d+ bytes pulled/, 'the changed chunk and the new one; the new hole is written as zeros here');
  qemus.push((await until('pid reported', async () => (await hostsList()).find((h) => h.desktops[0]?.pid && !qemus.includes(h.desktops[0].pid))))!.desktops[0]!.pid!);
  assert.equal((await power('online1', 'off')).status, 200);
  await placedAs('online1', 'stopped');
  const out = join(dataDir, 'read-back.raw');
  await convertChain(hostChain(readFileSync(join(dataDir, 'host.key')), dataDir, d.id, 'disk0'), out, 'raw');
  assert.ok(readFileSync(out).equals(image), "the host's disk is the new snapshot, byte for byte");

  // A host cut off (marked lost) while its guest ran, then released by an admin: when the host hears, it powers the guest off before discarding.
  assert.equal((await power('online1', 'on')).status, 200);
  await placedAs('online1', 'running');
  const orphan = (await until('pid reported', async () => (await hostsList()).find((h) => h.desktops[0]?.pid && !qemus.includes(h.desktops[0].pid))))!.desktops[0]!.pid!;
  qemus.push(orphan);
  assert.ok(await broker.ctx.hosts.unplace(d.id, ['running']), 'as release leaves it');
  await broker.ctx.hosts.queue({ hostId: 'h1', desktopId: d.id, type: 'discard' });
  await until('discard done', async () => (await events('host-discard')).find((e) => /^powered off; /.test(e.detail ?? '')), 15_000);
  assert.throws(() => process.kill(orphan, 0), { code: 'ESRCH' }, 'the guest no longer runs');
});

/** Writes into a chain the way its guest would (a storage daemon's writable export of the top), while no QEMU holds it. */
async function writeChain(chain: Chain, writes: { offset: number; data: Buffer }[]): Promise<void> {
  const dir = mkdtempSync(join(tmpdir(), 'carryon-w-'));
  dirs.push(dir);
  const qsd = await StorageDaemon.start(join(dir, 'run'));
  try {
    await addChain(qsd, { files: chain.files, secretId: 'sec-t', baseSecretId: 'sec-b', baseReadOnly: true, prefix: 'w' }, chain.secret, chain.baseSecret);
    await qsd.exportNbd(join(dir, 'run', 'w.sock'), [{ node: 'w-top', name: 'disk0', writable: true }]);
    const c = await NbdClient.connect(join(dir, 'run', 'w.sock'), 'disk0');
    for (const w of writes) await c.write(w.offset, w.data);
    await c.flush();
    await c.close();
  } finally {
    await qsd.stop();
  }
}
const logs: string[] = [];
const laptopEnv = (home: string): ClientEnv => ({ home, user: 'alice', password: async () => 'alice-password', log: (l) => logs.push(l), pollMs: 50 });

test('check-out of a desktop running on a host: the host shuts it down (forced after the grace, audited), sends back only what the guest wrote, and the laptop gets it byte for byte', async () => {
  const d = (await broker.ctx.meta.getDesktop('online1'))!;
  const chunk = 256 * 1024;
  // The guest's writes: kept in the host's top between two runs (written while it was stopped), then it runs again.
  assert.equal((await power('online1', 'on')).status, 200);
  await placedAs('online1', 'running');
  assert.equal((await power('online1', 'off')).status, 200);
  await placedAs('online1', 'stopped');
  const writes = [{ offset: 3 * chunk + 4096, data: randomBytes(8192) }, { offset: 10 * chunk, data: randomBytes(chunk) }];
  await writeChain(hostChain(readFileSync(join(h1Dir, 'host.key')), h1Dir, d.id, 'disk0'), writes);
  assert.equal((await power('online1', 'on')).status, 200);
  await placedAs('online1', 'running');
  qemus.push((await until('pid reported', async () => (await hostsList()).find((h) => h.id === 'h1' && h.desktops[0]?.pid && !qemus.includes(h.desktops[0].pid))))!.desktops[0]!.pid!);
  const expected = readFileSync(join(broker.dir, 'online1-v2.raw'));
  for (const w of writes) w.data.copy(expected, w.offset);

  const home = join(broker.dir, 'laptop-online');
  await enroll(laptopEnv(home), broker.url, { fingerprint: broker.fingerprint, name: 'laptop-online' });
  // The host's pages wait until the laptop has fetched the snapshot the host ran from (so the test shows what travels when, on any load).
  const base = decodeManifest((await broker.ctx.store.getManifest((await broker.ctx.meta.getSnapshot((await placement('online1'))!.snapshotId!))!.disks[0]!.digest))!);
  const step = broker.ctx.hosts.handoverStep.bind(broker.ctx.hosts);
  broker.ctx.hosts.handoverStep = async (...a) => {
    if (a[2] === 'sending') await until('the laptop fetched ahead', async () => logs.some((l) => /^fetched snapshot \S+ ahead while the host handed the desktop over/.test(l)), 20_000).catch(() => undefined);
    return step(...a);
  };
  let co: Awaited<ReturnType<typeof laptopCheckout>>;
  try {
    co = await laptopCheckout(laptopEnv(home), 'online1');
  } finally {
    broker.ctx.hosts.handoverStep = step;
  }
  assert.ok(logs.some((l) => /^host h1 is sending back what online1 wrote \(the guest did not shut down within 1 s/.test(l)), logs.join('\n'));
  assert.ok((await readDesktop(laptopEnv(home), 'online1')).equals(expected), "the laptop's disk is the host's, byte for byte");
  // During the handover every chunk of the old snapshot came; after the commit only the 2 the guest changed.
  const present = base.chunks.filter(Boolean).length;
  assert.deepEqual(co.prefetched && [co.prefetched.chunks, co.prefetched.kept + co.prefetched.dropped], [present, present], JSON.stringify(co.prefetched));
  assert.ok(co.prefetched!.dropped <= 2, JSON.stringify(co.prefetched));
  assert.equal(co.chunksMoved, 2, 'only the changed chunks travelled after the commit');
  assert.ok(!existsSync(join(home, 'desktops', d.id, 'prefetch.json')), 'the check-out owns what was fetched ahead');
  // Each step is an event of the desktop; the paused guest ignores ACPI: forced, and said so.
  const shutdown = (await events('guest-shutdown')).find((e) => e.actor === 'host:h1')!;
  assert.equal(shutdown.outcome, 'failed');
  assert.match(shutdown.detail ?? '', /^forced: the guest did not shut down within 1 s: powered off/);
  assert.match((await events('snapshot')).find((e) => e.actor === 'host:h1')!.detail ?? '', /^checkpoint \S+ of check-out \S+: 2 chunks the guest changed on host h1$/);
  assert.ok((await events('handover-request')).some((e) => e.actor === 'alice'));
  // Only the touched chunks' written pages went up (the 8 KiB write travelled as its pages, not its chunk).
  const up = (await events('host-handover')).find((e) => e.outcome === 'ok')!;
  assert.match(up.detail ?? '', /2 chunks changed, 2 sent \((\d+) bytes\)/);
  assert.ok(Number(/\((\d+) bytes\)/.exec(up.detail ?? '')![1]) < chunk + 64 * 1024, up.detail ?? '');
  assert.equal(co.chunksMoved > 0, true);
  // The desktop left the host: no placement, the host dropped its top (kept its base), the checkpoint is the host's snapshot.
  assert.equal(await placement('online1'), null);
  assert.equal(existsSync(join(h1Dir, 'desktops', d.id, 'disk0', 'top.qcow2')), false);
  assert.ok(existsSync(join(h1Dir, 'desktops', d.id, 'disk0', 'base.qcow2')));
  const active = (await broker.ctx.meta.activeCheckout(d.id))!;
  assert.equal(active.state, 'checked_out');
  assert.equal(active.checkpointSnapshot, (await broker.ctx.meta.getDesktop('online1'))!.currentSnapshot);
  assert.equal((await power('online1', 'on')).body.error, 'locked');
});

test('policy startOnlineAfterCheckin: after the laptop checks in, the desktop starts on the host by itself, which pulls only the changed chunks and ends up byte for byte', async () => {
  const home = join(broker.dir, 'laptop-online');
  const chunk = 256 * 1024;
  assert.equal((await http.call('PATCH', '/v1/admin/policies/desktop/online1', { startOnlineAfterCheckin: true }, admin)).status, 200);
  await writeDesktop(laptopEnv(home), 'online1', [{ offset: 7 * chunk + 512, data: randomBytes(4096) }]);
  const expected = await readDesktop(laptopEnv(home), 'online1');
  await upload(laptopEnv(home), 'online1', 'checkin');
  const started = (await events('power-on')).find((e) => e.actor === 'system' && e.outcome === 'ok');
  assert.match(started?.detail ?? '', /^placed on host h1 \(snapshot /, 'on the host that keeps its base');
  await placedAs('online1', 'running');
  // The base held the snapshot the host started from before the handover: its 2 chunks and the laptop's 1 travel, nothing else.
  assert.match((await events('host-start')).filter((e) => e.outcome === 'ok')[0]!.detail ?? '', /; 3 chunks \/ \d+ bytes pulled/);
  qemus.push((await until('pid reported', async () => (await hostsList()).find((h) => h.id === 'h1' && h.desktops[0]?.pid && !qemus.includes(h.desktops[0].pid))))!.desktops[0]!.pid!);
  assert.equal((await power('online1', 'off')).status, 200);
  await placedAs('online1', 'stopped');
  const d = (await broker.ctx.meta.getDesktop('online1'))!;
  const out = join(h1Dir, 'read-back-2.raw');
  await convertChain(hostChain(readFileSync(join(h1Dir, 'host.key')), h1Dir, d.id, 'disk0'), out, 'raw');
  assert.ok(readFileSync(out).equals(expected), "the host's disk is the laptop's check-in, byte for byte");
  assert.equal((await http.call('PATCH', '/v1/admin/policies/desktop/online1', { startOnlineAfterCheckin: false }, admin)).status, 200);
});

/** The disk a snapshot holds, read from the broker's store (what a fail-over or a check-out starts from). */
async function snapshotImage(snapshotId: string): Promise<Buffer> {
  const s = (await broker.ctx.meta.getSnapshot(snapshotId))!;
  const d = (await broker.ctx.meta.getDesktop(s.desktopId))!;
  const keys = unwrapLineageKeys(broker.ctx.secrets.masterKey, (await broker.ctx.meta.getLineageKeys(d.lineageId))!, `lineage:${d.lineageId}`);
  const m = decodeManifest((await broker.ctx.store.getManifest(s.disks[0]!.digest))!);
  const out = Buffer.alloc(m.diskSize);
  for (const [i, id] of m.chunks.entries()) if (id) openBlob(keys, id as ChunkId, (await broker.ctx.store.get(id as ChunkId))!).copy(out, i * m.chunkSize);
  return out;
}

test('host replicas: a running desktop is replicated to a restore point that becomes its snapshot (byte for byte), the next sends only new pages; only its host, its job, receipts; a check-out meanwhile refuses it and nothing is lost', async () => {
  const d = (await broker.ctx.meta.getDesktop('online1'))!;
  const key = readFileSync(join(h1Dir, 'host.key'));
  const chunk = 256 * 1024;
  const disk = join(h1Dir, 'desktops', d.id, 'disk0');
  assert.equal((await placement('online1'))!.state, 'stopped');
  const expected = await snapshotImage(d.currentSnapshot!);
  // The guest's writes (a paused guest writes nothing: written into the kept top while it is stopped).
  const onWith = async (writes: { offset: number; data: Buffer }[]) => {
    if ((await placement('online1'))!.state === 'running') {
      assert.equal((await power('online1', 'off')).status, 200);
      await placedAs('online1', 'stopped');
    }
    await writeChain(hostChain(key, h1Dir, d.id, 'disk0'), writes);
    for (const w of writes) w.data.copy(expected, w.offset);
    assert.equal((await power('online1', 'on')).status, 200);
    await placedAs('online1', 'running');
    qemus.push((await until('pid reported', async () => (await hostsList()).find((h) => h.id === 'h1' && h.desktops[0]?.pid && !qemus.includes(h.desktops[0].pid))))!.desktops[0]!.pid!);
  };
  await onWith([{ offset: 5 * chunk + 1024, data: randomBytes(4096) }, { offset: 12 * chunk, data: randomBytes(chunk) }]);

  const r1 = await host!.replicate(d.id);
  assert.match(r1, /^replica \S+: 2 chunks changed, 2 sent \(\d+ bytes\)$/);
  const snap1 = (await broker.ctx.meta.getSnapshot((await broker.ctx.meta.getDesktop('online1'))!.currentSnapshot!))!;
  assert.deepEqual([snap1.kind, snap1.parentId], ['replica', d.currentSnapshot]);
  assert.ok((await snapshotImage(snap1.id)).equals(expected), "the broker's current snapshot holds the guest's writes, byte for byte");
  assert.equal((await placement('online1'))!.snapshotId, snap1.id, 'a fail-over starts from it');
  // The frozen layer went into the host's base, which now holds the replica (the guest writes on in the other top).
  assert.equal((JSON.parse(readFileSync(join(disk, 'base.json'), 'utf8')) as { digest: string }).digest, snap1.disks[0]!.digest);
  assert.deepEqual(JSON.parse(readFileSync(join(disk, 'layout.json'), 'utf8')), { v: 1, top: 'top-b.qcow2', under: null, mergingTo: null });
  assert.equal(existsSync(join(disk, 'top.qcow2')), false);
  assert.match((await events('snapshot')).find((e) => e.actor === 'host:h1')!.detail ?? '', new RegExp(`^replica ${snap1.id}: 2 chunks the guest changed on host h1 since ${d.currentSnapshot}$`));

  // The next replica: only what was written since (one 8 KiB write: its pages, not its chunk).
  await onWith([{ offset: 9 * chunk + 8192, data: randomBytes(8192) }]);
  const r2 = await host!.replicate(d.id);
  const bytes = Number(/^replica \S+: 1 chunks changed, 1 sent \((\d+) bytes\)$/.exec(r2)?.[1] ?? NaN);
  assert.ok(bytes < 64 * 1024, r2);
  const snap2 = (await broker.ctx.meta.getDesktop('online1'))!.currentSnapshot!;
  assert.equal((await broker.ctx.meta.getSnapshot(snap2))!.parentId, snap1.id);
  assert.ok((await snapshotImage(snap2)).equals(expected));

  // The broker's rules: only the host it runs on, only its open job, only chunks it pushed.
  const id = d.id;
  const other = await hostCall(`/v1/hosts/fake/desktops/${id}/replica`, {});
  assert.deepEqual([other.status, other.body.error], [409, 'not-running-here']);
  assert.equal((await hostCall(`/v1/hosts/h1/desktops/${id}/replica`, {}, 'wrong')).status, 401);
  const begun = await hostCall(`/v1/hosts/h1/desktops/${id}/replica`, {});
  assert.equal(begun.status, 200, JSON.stringify(begun.body));
  const jobId = (begun.body.job as { id: string }).id;
  const notMine = await hostCall(`/v1/hosts/h1/desktops/${id}/replica/commit`, { jobId: 'another-job', disks: [] });
  assert.deepEqual([notMine.status, notMine.body.error], [409, 'no-replica']);
  const foreign = await hostCall(`/v1/hosts/h1/desktops/${id}/replica/commit`, { jobId, disks: [{ name: 'disk0', changes: [[0, 'a'.repeat(64)]] }] });
  assert.deepEqual([foreign.status, foreign.body.error], [400, 'bad-changes'], JSON.stringify(foreign.body));
  assert.equal((await hostCall(`/v1/hosts/h1/desktops/${id}/replica/abandon`, { jobId, message: 'test' })).status, 200);
  assert.equal((await broker.ctx.scheduler.get(jobId))!.state, 'failed');
  assert.equal((await broker.ctx.meta.getDesktop('online1'))!.currentSnapshot, snap2, 'no snapshot made');

  // QEMU dies with a point open (the host's kill leaves the same on disk): the broker's job ends, the
  // layout still names the frozen layer, and the next start settles it (the writes back into it) before the chain opens.
  await onWith([{ offset: 11 * chunk, data: randomBytes(4096) }]);
  const dying = (await hostsList()).find((h) => h.id === 'h1')!.desktops[0]!.pid!;
  await assert.rejects(host!.replicate(d.id, { beforeCommit: async () => {
    process.kill(dying, 'SIGKILL');
    throw new Error('QEMU died');
  } }), /QEMU died|closed|QMP/i);
  assert.notEqual((JSON.parse(readFileSync(join(disk, 'layout.json'), 'utf8')) as { under: string | null }).under, null, 'the point is still open on disk');
  await placedAs('online1', 'stopped');
  assert.equal((await power('online1', 'on')).status, 200);
  await placedAs('online1', 'running');
  qemus.push((await until('pid reported', async () => (await hostsList()).find((h) => h.id === 'h1' && h.desktops[0]?.pid && !qemus.includes(h.desktops[0].pid))))!.desktops[0]!.pid!);
  assert.equal((JSON.parse(readFileSync(join(disk, 'layout.json'), 'utf8')) as { under: string | null }).under, null, 'settled');
  assert.match(await host!.replicate(d.id), /^replica \S+: 1 chunks changed, 1 sent/);
  const snap3 = (await broker.ctx.meta.getDesktop('online1'))!.currentSnapshot!;
  assert.ok((await snapshotImage(snap3)).equals(expected), 'nothing lost');

  // A check-out comes while the pages travel: the commit is refused, the host abandons the point (the
  // writes go back into its top), and the handover that follows sends them all: nothing lost.
  await onWith([{ offset: 14 * chunk, data: randomBytes(chunk) }]);
  let checkoutId = '';
  await assert.rejects(host!.replicate(d.id, {
    beforeCommit: async () => {
      const co = await checkout('online1');
      assert.equal(co.status, 202, JSON.stringify(co.body));
      checkoutId = (co.body.checkout as { id: string }).id;
    },
  }), /not running on host h1 \(it is returning on h1\)/);
  assert.ok((await events('host-replica-commit')).some((e) => e.actor === 'host:h1' && e.outcome === 'denied' && /not-running-here/.test(e.detail ?? '')), 'audited');
  assert.equal((await broker.ctx.meta.getDesktop('online1'))!.currentSnapshot, snap3);
  assert.deepEqual((await broker.ctx.scheduler.openJobs()).filter((j) => j.checkoutId === `host:h1:${d.id}` && j.kind === 'replicate'), [], "the host's abandon ended its upload job");
  await until('handover done', async () => ((await http.call('GET', `/v1/checkouts/${checkoutId}/handover`, undefined, alice)).body.handover as { step: string }).step === 'done', 30_000);
  const checkpoint = (await broker.ctx.meta.getCheckout(checkoutId))!.checkpointSnapshot!;
  assert.ok((await snapshotImage(checkpoint)).equals(expected), "the check-out's checkpoint holds every write, the refused replica's too");
  assert.equal((await http.call('POST', `/v1/checkouts/${checkoutId}/cancel`, {}, alice)).status, 200);
});

test('a replica whose commit answer is lost: committed, the host learns it at its next contact and folds as if it had heard (after a stop: offline; running: live); not committed, it commits it then, or (refused by a check-out meanwhile) puts the writes back and hands them over; nothing lost', async () => {
  const d = (await broker.ctx.meta.getDesktop('online1'))!;
  const key = readFileSync(join(h1Dir, 'host.key'));
  const chunk = 256 * 1024;
  const disk = join(h1Dir, 'desktops', d.id, 'disk0');
  const pending = join(h1Dir, 'replica-commits', `${d.id}.json`);
  const current = async () => (await broker.ctx.meta.getDesktop('online1'))!.currentSnapshot!;
  const layout = () => JSON.parse(readFileSync(join(disk, 'layout.json'), 'utf8')) as { under: string | null; mergingTo: string | null };
  const baseDigest = () => (JSON.parse(readFileSync(join(disk, 'base.json'), 'utf8')) as { digest: string }).digest;
  const digestOf = async (snapshotId: string) => (await broker.ctx.meta.getSnapshot(snapshotId))!.disks[0]!.digest;
  const newPid = async () => qemus.push((await until('pid reported', async () => (await hostsList()).find((h) => h.id === 'h1' && h.desktops[0]?.pid && !qemus.includes(h.desktops[0].pid))))!.desktops[0]!.pid!);
  const cycle = async (state: 'running' | 'stopped') => {
    assert.equal((await power('online1', state === 'running' ? 'on' : 'off')).status, 200);
    await placedAs('online1', state);
    if (state === 'running') await newPid();
  };
  // Started once (the host's chain for the current snapshot), stopped, written as a guest would, started again.
  await cycle('running');
  const expected = await snapshotImage(await current());
  const onWith = async (writes: { offset: number; data: Buffer }[]) => {
    await cycle('stopped');
    await writeChain(hostChain(key, h1Dir, d.id, 'disk0'), writes);
    for (const w of writes) w.data.copy(expected, w.offset);
    await cycle('running');
  };
  const lost = (why: string) => new BrokerUnreachable('offline', `injected: ${why} (POST … was sent and may have been applied)`, true);
  /** The broker commits; its answer never reaches the host. */
  const answerLost = async <T>(send: () => Promise<T>): Promise<T> => {
    await send();
    throw lost('the answer was lost');
  };
  /** The request never reached the broker (the host cannot tell the two apart). */
  const neverSent = async <T>(): Promise<T> => {
    throw lost('no answer');
  };

  // 1. Committed, the answer lost; the guest is then stopped: the next start asks again, is told the snapshot, and folds offline.
  await onWith([{ offset: 2 * chunk + 100, data: randomBytes(5000) }, { offset: 9 * chunk, data: randomBytes(chunk) }]);
  const s0 = await current();
  await assert.rejects(host!.replicate(d.id, { commitVia: answerLost }), /the broker's answer to the replica commit was lost .*nothing is lost/);
  const x = await current();
  assert.notEqual(x, s0, 'the broker committed it');
  assert.ok((await snapshotImage(x)).equals(expected));
  assert.notEqual(layout().under, null, 'the host keeps the point frozen');
  assert.ok(existsSync(pending), 'and what it sent, to ask again');
  await cycle('stopped');
  await cycle('running');
  assert.deepEqual([layout().under, existsSync(pending)], [null, false], 'settled');
  assert.equal(baseDigest(), await digestOf(x), "the host's base is the broker's snapshot: no host-chain-diverged");
  assert.ok((await events('host-replica-commit')).some((e) => e.actor === 'host:h1' && e.outcome === 'ok' && /committed already as .*told again/.test(e.detail ?? '')), 'audited');
  assert.match(await host!.replicate(d.id), /^replica \S+: 0 chunks changed/, 'the next replica goes on from it');

  // 2. Not committed (no answer, the broker never heard it), the guest running on: the next replica asks again, the broker commits it then, the host folds live.
  await onWith([{ offset: 4 * chunk, data: randomBytes(chunk) }]);
  const s1 = await current();
  await assert.rejects(host!.replicate(d.id, { commitVia: neverSent }), /answer to the replica commit was lost/);
  assert.equal(await current(), s1, 'nothing committed yet');
  assert.notEqual(layout().under, null);
  assert.match(await host!.replicate(d.id), /^the last replica's commit, asked again, is committed/);
  const y = await current();
  assert.notEqual(y, s1);
  assert.deepEqual([(await broker.ctx.meta.getSnapshot(y))!.kind, (await broker.ctx.meta.getSnapshot(y))!.parentId], ['replica', s1]);
  assert.ok((await snapshotImage(y)).equals(expected), 'byte for byte');
  assert.deepEqual([layout().under, existsSync(pending), baseDigest()], [null, false, await digestOf(y)]);

  // 3. Not committed, and a check-out comes before the host asks again: the broker refuses it (the desktop is returning),
  //    the host ends its job and puts the writes back into the top, and the handover sends them all.
  await onWith([{ offset: 13 * chunk + 4096, data: randomBytes(8192) }]);
  await assert.rejects(host!.replicate(d.id, { commitVia: neverSent }), /answer to the replica commit was lost/);
  const co = await checkout('online1');
  assert.equal(co.status, 202, JSON.stringify(co.body));
  const checkoutId = (co.body.checkout as { id: string }).id;
  await until('handover done', async () => ((await http.call('GET', `/v1/checkouts/${checkoutId}/handover`, undefined, alice)).body.handover as { step: string }).step === 'done', 30_000);
  assert.ok((await snapshotImage((await broker.ctx.meta.getCheckout(checkoutId))!.checkpointSnapshot!)).equals(expected), "the check-out's checkpoint holds every write");
  assert.equal(existsSync(pending), false);
  assert.deepEqual((await broker.ctx.scheduler.openJobs()).filter((j) => j.checkoutId === `host:h1:${d.id}` && j.kind === 'replicate'), [], 'the unanswered job ended');
  assert.equal((await http.call('POST', `/v1/checkouts/${checkoutId}/cancel`, {}, alice)).status, 200);
});

test('handover protocol: cancel before the host begins leaves the guest running; cancel after the shutdown leaves it stopped with its writes kept; only the host that holds it, with receipts', async () => {
  // A host that only speaks the protocol, with more room than h1 (and less than h2 later): online2 goes there.
  assert.equal((await hostCall('/v1/hosts/register', { id: 'f2', vcpus: 4, ramMiB: 2048, maxDesktops: 2, accel: 'tcg', heartbeatSec: 300 })).status, 200);
  assert.equal((await hostCall('/v1/hosts/register', { id: 'f3', vcpus: 1, ramMiB: 64, maxDesktops: 1, accel: 'tcg', heartbeatSec: 300 })).status, 200);
  const beat = async () => (await hostCall('/v1/hosts/f2/heartbeat', {})).body.commands as { id: string; type: string; desktopId: string }[];
  const ack = (c: { id: string }, body: unknown) => hostCall(`/v1/hosts/f2/commands/${c.id}`, body);
  const id = await desktopId('online2');
  assert.deepEqual((await power('online2', 'on')).body, { state: 'starting', host: 'f2' });
  const start = (await beat()).find((c) => c.type === 'start')!;
  assert.equal((await ack(start, { ok: true, message: 'running' })).status, 200);
  await hostCall('/v1/hosts/f2/heartbeat', { desktops: [{ desktopId: id, state: 'running' }] });
  assert.equal((await placement('online2'))!.state, 'running');
  const step = (rest: string, body: unknown, as = 'f2') => hostCall(`/v1/hosts/${as}/desktops/${id}/handover${rest}`, body);

  // 1. Cancelled before the host took it: the host is refused, says the guest still runs, and it stays running.
  const first = await checkout('online2');
  assert.deepEqual([first.status, (first.body.handover as { step: string }).step], [202, 'asked'], JSON.stringify(first.body));
  const firstId = (first.body.checkout as { id: string }).id;
  const again = await checkout('online2');
  assert.deepEqual([again.status, (again.body.checkout as { id: string }).id], [202, firstId], 'asked again: the same check-out');
  assert.equal((await http.call('GET', `/v1/checkouts/${firstId}/handover`, undefined, alice)).body.handover && 'ok', 'ok');
  const cmd1 = (await beat()).find((c) => c.type === 'handover')!;
  assert.equal((await http.call('POST', `/v1/checkouts/${firstId}/cancel`, {}, alice)).status, 200);
  const refused = await step('', {});
  assert.deepEqual([refused.status, refused.body.error], [409, 'cancelled']);
  assert.equal((await ack(cmd1, { ok: false, message: String(refused.body.message), guest: 'running' })).status, 200);
  assert.equal((await placement('online2'))!.state, 'running', 'still running on the host');
  assert.equal((await broker.ctx.meta.getDesktop('online2'))!.powerState, 'on');

  // 2. Begun and shut down, then cancelled: the commit is refused and the desktop stays stopped there, its writes kept.
  const second = await checkout('online2');
  assert.equal(second.status, 202);
  const secondId = (second.body.checkout as { id: string }).id;
  const cmd2 = (await beat()).find((c) => c.type === 'handover')!;
  assert.deepEqual([(await step('', {}, 'f3')).status], [409], 'another host cannot take it');
  const begun = await step('', {});
  assert.equal(begun.status, 200, JSON.stringify(begun.body));
  assert.deepEqual([(await step('', {})).status], [409], 'begun once');
  assert.equal((await step('/shutdown', { forced: false, message: 'shut down (QEMU exit 0)' })).status, 200);
  assert.equal((await http.call('GET', `/v1/checkouts/${secondId}/handover`, undefined, alice)).body.handover && ((await http.call('GET', `/v1/checkouts/${secondId}/handover`, undefined, alice)).body.handover as { step: string }).step, 'sending');
  // A chunk it never pushed (no receipt of its upload) is refused, as for a laptop.
  const foreign = await step('/commit', { disks: [{ name: 'disk0', changes: [[0, 'a'.repeat(64)]] }] });
  assert.deepEqual([foreign.status, foreign.body.error], [400, 'bad-changes'], JSON.stringify(foreign.body));
  assert.equal((await http.call('POST', `/v1/checkouts/${secondId}/cancel`, {}, alice)).status, 200);
  const late = await step('/commit', { disks: [] });
  assert.deepEqual([late.status, late.body.error], [409, 'cancelled']);
  assert.equal((await ack(cmd2, { ok: false, message: 'the check-out was cancelled', guest: 'stopped' })).status, 200);
  assert.equal((await placement('online2'))!.state, 'stopped', 'stopped on the host with its writes');
  assert.equal((await broker.ctx.scheduler.get((begun.body.job as { id: string }).id))!.state, 'failed', "the host's upload job ended");
  assert.equal((await broker.ctx.meta.getDesktop('online2'))!.currentSnapshot, (await placement('online2'))!.snapshotId, 'no snapshot made');

  // 3. A laptop that fetched the old snapshot ahead, then the user cancels during the handover: nothing of it is served, all erased, the ticket ended.
  const home = join(broker.dir, 'laptop-cancel');
  await enroll(laptopEnv(home), broker.url, { fingerprint: broker.fingerprint, name: 'laptop-cancel' });
  logs.length = 0;
  const going = laptopCheckout(laptopEnv(home), 'online2');
  going.catch(() => undefined);
  const cmd3 = await until('handover command', async () => (await beat()).find((c) => c.type === 'handover' && c.id !== cmd2.id && c.id !== cmd1.id));
  const third = (await broker.ctx.meta.activeCheckout(id))!;
  const prefetchJob = (await broker.ctx.hosts.handover(third.id))!.prefetchJobId!;
  assert.ok(prefetchJob, 'a prefetch job was opened with the handover');
  // Its ticket is the holder's alone: an admin sees the job, never its ticket.
  assert.equal((await http.call('GET', `/v1/jobs/${prefetchJob}`, undefined, admin)).body.transfer, undefined);
  // The long poll: answered as soon as the step moves (not after its 20 s).
  const t0 = Date.now();
  const polled = http.call('GET', `/v1/checkouts/${third.id}/handover?after=asked&waitMs=20000`, undefined, alice);
  await new Promise((r) => setTimeout(r, 200));
  assert.equal((await step('', {})).status, 200);
  assert.equal(((await polled).body.handover as { step: string }).step, 'shutting-down');
  assert.ok(Date.now() - t0 < 10_000, `long poll answered after ${Date.now() - t0} ms`);
  const idle = Date.now();
  assert.equal(((await http.call('GET', `/v1/checkouts/${third.id}/handover?after=shutting-down&waitMs=300`, undefined, alice)).body.handover as { step: string }).step, 'shutting-down');
  assert.ok(Date.now() - idle >= 280, 'an unchanged step is answered after waitMs');
  assert.equal((await step('/shutdown', { forced: false, message: 'shut down (QEMU exit 0)' })).status, 200);
  await until('the laptop fetched ahead', async () => logs.some((l) => /^fetched snapshot \S+ ahead/.test(l)), 30_000);
  assert.ok(existsSync(join(home, 'desktops', id, 'prefetch.json')) && existsSync(join(home, 'desktops', id, 'disks', 'disk0', 'base.qcow2')));
  assert.equal((await http.call('POST', `/v1/checkouts/${third.id}/cancel`, {}, alice)).status, 200);
  await assert.rejects(going, (err: Error) => /did not hand online2 over \(the check-out is cancelled\)/.test(err.message));
  assert.equal((await broker.ctx.scheduler.get(prefetchJob))!.state, 'cancelled', "the prefetch's ticket ended");
  assert.deepEqual(readdirSync(join(home, 'desktops', id)).filter((f) => ['disks', 'manifests', 'prefetch.json', 'state.json'].includes(f)), [], 'erased: no base, no state');
  await assert.rejects(readDesktop(laptopEnv(home), 'online2'), /not checked out to this device/);
  assert.equal((await ack(cmd3, { ok: false, message: 'the check-out was cancelled', guest: 'stopped' })).status, 200);
  assert.deepEqual((await http.call('POST', '/v1/admin/desktops/online2/release', { reason: 'test' }, admin)).body, { released: 'f2' });
});

test('a host killed with -9: it is marked lost after three missed heartbeats, and the desktop it ran with it (audited); check-out stays refused; an admin fails it over to another host, the lost one keeps its copy until released', async () => {
  const dataDir = mkdtempSync(join(tmpdir(), 'carryon-host-'));
  dirs.push(dataDir);
  const secretFile = join(broker.dir, 'h2.credential');
  writeFileSync(secretFile, `${await hostCredential(broker, 'h2')}\n`, { mode: 0o600 });
  child = spawn(process.execPath, [main, 'host', '--broker', broker.url, '--broker-fingerprint', broker.fingerprint, '--secret-file', secretFile, '--data-dir', dataDir,
    '--id', 'h2', '--vcpus', '4', '--ram-mib', '8192', '--max-desktops', '4', '--accel', 'tcg', '--heartbeat-sec', '1', '--replicate-sec', '1', '--paused-guests'], { stdio: ['ignore', 'pipe', 'pipe'] });
  let stderr = '';
  child.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
  await until('h2 registered', async () => (await hostsList()).some((h) => h.id === 'h2'), 30_000).catch((err: Error) => assert.fail(`${err.message}: ${stderr}`));
  // Placed where the most RAM is free: h2.
  const on = await power('online2', 'on');
  assert.deepEqual([on.status, on.body.host], [200, 'h2'], JSON.stringify(on.body));
  await placedAs('online2', 'running').catch(async (err: Error) => assert.fail(`${err.message}: ${stderr} ${JSON.stringify(await placement('online2'))} ${JSON.stringify(await hostsList())} pending ${JSON.stringify(await broker.ctx.hosts.pending('h2'))} jobs ${JSON.stringify(await broker.ctx.scheduler.openJobs())}`));
  const pid = (await until('pid reported', async () => (await hostsList()).find((h) => h.id === 'h2' && h.desktops[0]?.pid)))!.desktops[0]!.pid!;
  qemus.push(pid);
  assert.equal(child.exitCode, null, 'the host process runs on its own (nothing but its heartbeat keeps it alive)');
  // It replicates the running desktop in the background (`--replicate-sec 1`): the loss window is that interval.
  const started = (await broker.ctx.meta.getDesktop('online2'))!.currentSnapshot;
  const replica = await until('a background replica', async () => {
    const cur = (await broker.ctx.meta.getDesktop('online2'))!.currentSnapshot!;
    return cur !== started && (await broker.ctx.meta.getSnapshot(cur))!.kind === 'replica' ? cur : null;
  }, 30_000);
  const exited = new Promise((r) => child!.once('exit', (_code, signal) => r(signal)));
  child.kill('SIGKILL');
  assert.equal(await exited, 'SIGKILL');
  // Marked by the broker's own sweep, with nobody looking (the other host stopped heartbeating first).
  await host!.close();
  host = null;
  await until('h2 marked', async () => (await broker.ctx.hosts.host('h2'))?.health === 'lost', 10_000);
  assert.equal((await hostsList()).find((h) => h.id === 'h1')!.health, 'retired', 'a host that stopped cleanly is not lost');
  const lost = (await hostsList()).find((h) => h.id === 'h2')!;
  assert.deepEqual(lost.desktops.map((d) => d.state), ['lost']);
  assert.equal((await broker.ctx.meta.getDesktop('online2'))!.powerState, 'lost');
  assert.ok((await events('host-lost')).some((e) => e.actor === 'system' && /host h2 stopped heartbeating/.test(e.detail ?? '')), 'audited');
  const co = await checkout('online2');
  assert.deepEqual([co.status, co.body.error], [409, 'desktop-online']);
  assert.match(String(co.body.message), /host h2, which stopped answering/);
  // The admin CLI shows the same.
  const out = await promisify(execFile)(process.execPath, [main, 'admin', 'hosts', 'list'], { env: { ...process.env, CARRYON_URL: broker.url, CARRYON_FINGERPRINT: broker.fingerprint, CARRYON_USER: ADMIN.name, CARRYON_PASSWORD: ADMIN.password } });
  assert.match(out.stdout, /h2\s+lost\s+.*online2 \(lost/);

  // Fail-over, an admin's explicit decision: started on another host from its last snapshot; h2 keeps what the guest wrote there (at risk).
  const id = await desktopId('online2');
  const f = await http.call('POST', '/v1/admin/desktops/online2/failover', { reason: 'h2 died' }, admin);
  assert.deepEqual([f.status, f.body.state, f.body.host], [200, 'starting', 'f2'], JSON.stringify(f.body));
  assert.match(String(f.body.atRisk), /^what the guest wrote on host h2 since snapshot \S+ \(running there since .*\) is at risk: that host keeps it until `carryon admin hosts release online2 --host h2`$/);
  assert.equal((await placement('online2'))!.snapshotId, (await broker.ctx.meta.getDesktop('online2'))!.currentSnapshot, 'from its last snapshot');
  assert.equal((await broker.ctx.meta.getSnapshot((await placement('online2'))!.snapshotId!))!.kind, 'replica', 'its newest replica');
  assert.ok(replica);
  assert.deepEqual((await broker.ctx.scheduler.openJobs()).filter((j) => j.checkoutId === `host:h2:${id}`), [], "the lost host's open jobs gave their slots back");
  assert.ok((await events('failover')).some((e) => e.outcome === 'ok' && /at risk.*reason: h2 died/.test(e.detail ?? '')), 'audited');
  assert.deepEqual((await hostsList()).find((h) => h.id === 'h2')!.desktops.map((d) => d.state), ['kept']);
  const twice = await http.call('POST', '/v1/admin/desktops/online2/failover', {}, admin);
  assert.deepEqual([twice.status, twice.body.error], [409, 'not-lost']);
  // h2 comes back still running its guest: powered off there (its chain kept), never discarded without an admin.
  const back = (await hostCall('/v1/hosts/h2/heartbeat', { desktops: [{ desktopId: id, state: 'running' }], bases: [id] })).body.commands as { type: string; desktopId: string }[];
  assert.deepEqual(back.map((c) => [c.type, c.desktopId]), [['off', id]]);
  // While h2 keeps that copy it is not given the desktop again, though it is alive, larger and holds its base.
  const f2start = (await hostCall('/v1/hosts/f2/heartbeat', {})).body.commands as { id: string; type: string }[];
  assert.equal((await hostCall(`/v1/hosts/f2/commands/${f2start.find((c) => c.type === 'start')!.id}`, { ok: false, message: 'test', kept: false })).status, 200);
  assert.equal(await placement('online2'), null);
  assert.equal((await power('online2', 'on')).body.host, 'f2');
  const released = await http.call('POST', '/v1/admin/desktops/online2/release', { host: 'h2', reason: 'test' }, admin);
  assert.deepEqual(released.body, { released: 'h2' });
  assert.ok((await broker.ctx.hosts.pending('h2')).some((c) => c.type === 'discard' && c.desktopId === id));
  assert.deepEqual((await hostsList()).find((h) => h.id === 'h2')!.desktops, []);
});
