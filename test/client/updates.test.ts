import assert from 'node:assert/strict';
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { appendFileSync, cpSync, existsSync, mkdirSync, mkdtempSync, readFileSync, readlinkSync, statSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { request } from 'undici';
import { runAgent } from '../../src/client/agent.js';
import { enroll, type ClientEnv } from '../../src/client/ops.js';
import { RELEASE_PIN } from '../../src/client/vault/release-pin.js';
import { loadReleasePrivateKey, newReleaseKey, RELEASE_SIGNATURE_HEADER, sha256File, signRelease, type ReleaseSignature } from '../../src/core/tokens/release.js';
import { pinnedAgent } from '../../src/net/pinned-agent.js';
import type { ReleaseRow } from '../../src/broker/releases/store.js';
import { ADMIN, api, cleanup, testBroker, type Api, type TestBroker } from '../broker/harness.js';

/**
 * Client updates end to end (issue 28): real bundles of this tree (`npm pack` at other version
 * numbers), a broker holding only the release public key, the agent in process (the running
 * 0.1.0) and then the installed launcher (a real process of the new version).
 */
// carryon-test: serial (a broker of its own, and carryon processes under a 60 s self-check limit)
process.env.CARRYON_SCRYPT_N = '1024';
const PASS = 'release-passphrase';
let broker: TestBroker;
let http: Api;
let admin: string;
let env: ClientEnv;
let deviceId: string;
let work: string;
let root: string;
const logs: string[] = [];
const key = newReleaseKey(PASS);
const other = newReleaseKey(PASS);
const bundles: Record<string, string> = {};

/** `npm pack` of this tree's build at `version` (dist/src only: what package.json's `files` ships); `broken`: its code does not load; `dependencies`: other ones. */
async function pack(version: string, broken = false, dependencies?: Record<string, string>): Promise<string> {
  const dir = mkdtempSync(join(work, `pack-${version}-`));
  const pkg = JSON.parse(readFileSync('package.json', 'utf8')) as Record<string, unknown>;
  writeFileSync(join(dir, 'package.json'), JSON.stringify({ ...pkg, version, scripts: {}, ...(dependencies ? { dependencies } : {}) }, null, 2));
  cpSync('dist/src', join(dir, 'dist', 'src'), { recursive: true });
  if (broken) {
    // The launcher (one bundle: scripts/bundle-cli.mjs), which every command loads: the new version cannot start.
    const loaded = join(dir, 'dist', 'src', 'cli', 'main.js');
    assert.ok(existsSync(loaded), `${loaded} moved: break another module the CLI loads`);
    appendFileSync(loaded, "\nthrow new Error('this build is broken');\n");
  }
  const out = await new Promise<string>((resolve, reject) => execFile('npm', ['pack', '--ignore-scripts', '--silent', '--pack-destination', work], { cwd: dir, encoding: 'utf8' }, (err, stdout) => (err ? reject(err) : resolve(stdout))));
  return join(work, out.trim().split('\n').pop()!);
}

async function sign(bundle: string, version: string, k = key): Promise<ReleaseSignature> {
  const { sha256, size } = await sha256File(bundle);
  return signRelease(loadReleasePrivateKey(k.privatePem, PASS), { v: 1, name: 'carryon', version, sha256, size });
}

async function publish(bundle: string, sig: ReleaseSignature, version: string): Promise<{ status: number; body: Record<string, unknown> }> {
  const agent = pinnedAgent(broker.fingerprint);
  try {
    const res = await request(`${broker.url}/v1/admin/releases/${version}`, { method: 'PUT', dispatcher: agent, body: readFileSync(bundle), headers: { 'content-type': 'application/octet-stream', authorization: `Bearer ${admin}`, [RELEASE_SIGNATURE_HEADER]: Buffer.from(JSON.stringify(sig)).toString('base64') } });
    return { status: res.statusCode, body: (await res.body.json()) as Record<string, unknown> };
  } finally {
    await agent.close();
  }
}

/** The carryon CLI as the launcher runs it (the installed `current`), or the tree's own. */
function cli(args: string[], opts: { launcher?: boolean; env?: Record<string, string> } = {}): Promise<{ code: number | null; out: string; err: string }> {
  const [cmd, argv] = opts.launcher ? [join(root, 'bin', 'carryon'), args] : [process.execPath, [join(process.cwd(), 'dist', 'src', 'cli', 'main.js'), ...args]];
  return new Promise((resolve) => {
    const child = spawn(cmd, argv, { env: { ...process.env, CARRYON_HOME: env.home, ...opts.env }, stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    let err = '';
    child.stdout.on('data', (d: Buffer) => { out += d.toString(); });
    child.stderr.on('data', (d: Buffer) => { err += d.toString(); });
    child.once('exit', (code) => resolve({ code, out, err }));
  });
}

const deviceRow = async () => ((await http.call('GET', '/v1/admin/devices', undefined, admin)).body.devices as { id: string; update: { ring: string; runningVersion: string | null; state: string | null; targetVersion: string | null; detail: string | null } }[]).find((d) => d.id === deviceId)!.update;
const current = () => readlinkSync(join(root, 'current'));

before(async () => {
  work = mkdtempSync(join(tmpdir(), 'carryon-updates-'));
  broker = await testBroker(undefined, { releasePublicKey: key.publicB64 });
  http = api(broker.url, broker.fingerprint);
  admin = await http.login(ADMIN.name, ADMIN.password);
  await http.call('POST', '/v1/admin/users', { name: 'alice', password: 'alice-password' }, admin);
  env = { home: join(work, 'laptop'), user: 'alice', password: async () => 'alice-password', log: (l) => void logs.push(l), pollMs: 20 };
  const deps = (JSON.parse(readFileSync('package.json', 'utf8')) as { dependencies: Record<string, string> }).dependencies;
  // The three packs (≈ 1.3 s of npm each on a quiet machine, much more on a loaded one) overlap the enrolment.
  const packed = Promise.all([pack('0.2.0'), pack('0.3.0', true), pack('0.5.0', false, { ...deps, 'left-pad': '^1.3.0' })]);
  deviceId = (await enroll(env, broker.url, { fingerprint: broker.fingerprint, name: 'laptop' })).deviceId;
  [bundles['0.2.0'], bundles['0.3.0'], bundles['0.5.0']] = await packed;
  // A managed install whose 0.1.0 is this tree (what the in-process agent runs).
  root = join(work, 'install');
  mkdirSync(join(root, 'versions', '0.1.0'), { recursive: true });
  symlinkSync(process.cwd(), join(root, 'versions', '0.1.0', 'package'));
  symlinkSync('versions/0.1.0', join(root, 'current'));
});
after(async () => {
  await http?.close();
  await broker?.close();
  if (work) cleanup(work);
  if (broker) cleanup(broker.dir);
});

test('enrolment pins the release key, signed by the device key', () => {
  const pin = JSON.parse(readFileSync(join(env.home, RELEASE_PIN), 'utf8')) as { publicKey: string };
  assert.equal(pin.publicKey, key.publicB64);
});

test('the broker refuses a bundle signed by another key, or not the one signed', async () => {
  const bad = await publish(bundles['0.2.0']!, await sign(bundles['0.2.0']!, '0.2.0', other), '0.2.0');
  assert.equal(bad.status, 400);
  assert.equal(bad.body.error, 'release-signature');
  // A signature over the 0.2.0 bundle does not carry the 0.3.0 bundle.
  const swapped = await publish(bundles['0.3.0']!, await sign(bundles['0.2.0']!, '0.3.0'), '0.3.0');
  assert.equal(swapped.status, 400);
  assert.equal(swapped.body.error, 'bundle-mismatch');
  assert.deepEqual((await http.call('GET', '/v1/admin/releases', undefined, admin)).body.releases, []);
});

test('a release rolled out to canary: waits while a desktop runs, resumes its download, installs beside 0.1.0, switches, and the new version runs and reports', async () => {
  // Signed and published with the admin CLI, as an admin would.
  writeFileSync(join(work, 'release-key.pem'), key.privatePem);
  const adminEnv = { CARRYON_URL: broker.url, CARRYON_FINGERPRINT: broker.fingerprint, CARRYON_USER: ADMIN.name, CARRYON_PASSWORD: ADMIN.password, CARRYON_RELEASE_PASSPHRASE: PASS };
  const signed = await cli(['admin', 'releases', 'sign', bundles['0.2.0']!, '--key', join(work, 'release-key.pem')], { env: adminEnv });
  assert.equal(signed.code, 0, signed.err);
  const published = await cli(['admin', 'releases', 'publish', bundles['0.2.0']!, '--signature', `${bundles['0.2.0']!}.sig`], { env: adminEnv });
  assert.equal(published.code, 0, published.err);
  assert.equal((await http.call('POST', '/v1/admin/releases/0.2.0/rollout', { ring: 'canary' }, admin)).status, 200);

  // A stable device is not offered a canary release.
  assert.equal((await runAgent(env, { once: true, installRoot: root })).update, undefined);
  assert.equal((await deviceRow()).runningVersion, '0.1.0');
  assert.equal((await http.call('POST', `/v1/admin/devices/${deviceId}/ring`, { ring: 'canary' }, admin)).status, 200);

  // A desktop in use (its owner claim names a live process): downloaded and verified, not applied.
  const holder: ChildProcess = spawn('sleep', ['60'], { stdio: 'ignore' });
  const run = join(env.home, 'desktops', 'busy-desktop', 'run');
  mkdirSync(run, { recursive: true });
  writeFileSync(join(run, 'owner.json'), JSON.stringify({ pid: holder.pid, kind: 'run' }));
  // Half the bundle is already here from an earlier try that was cut off.
  mkdirSync(join(root, 'downloads'), { recursive: true });
  const whole = readFileSync(bundles['0.2.0']!);
  writeFileSync(join(root, 'downloads', '0.2.0.tgz.part'), whole.subarray(0, whole.length >> 1));
  try {
    assert.equal((await runAgent(env, { once: true, installRoot: root })).update, 'waiting');
    assert.ok(logs.some((l) => l.includes(`resuming the download at ${whole.length >> 1} of ${whole.length} bytes`)), logs.join('\n'));
    assert.equal(current(), 'versions/0.1.0');
    assert.equal((await deviceRow()).state, 'waiting');
  } finally {
    holder.kill();
  }
  await new Promise((r) => holder.once('exit', r));

  assert.equal((await runAgent(env, { once: true, installRoot: root })).update, 'done');
  assert.equal(current(), 'versions/0.2.0');
  assert.ok(existsSync(join(root, 'versions', '0.1.0')), 'the old version stays beside the new one');
  assert.deepEqual({ state: (await deviceRow()).state, target: (await deviceRow()).targetVersion }, { state: 'done', target: '0.2.0' });

  // The launcher runs 0.2.0 now: its self-check, and its agent's heartbeat, say so.
  const check = await cli(['--json', 'self-check'], { launcher: true });
  assert.equal(check.code, 0, check.err);
  assert.equal((JSON.parse(check.out) as { version: string }).version, '0.2.0');
  const beat = await cli(['agent', '--once'], { launcher: true });
  assert.equal(beat.code, 0, beat.err);
  assert.equal((await deviceRow()).runningVersion, '0.2.0');
  const list = await cli(['admin', 'devices', 'list'], { env: adminEnv });
  assert.match(list.out, /0\.2\.0\s+canary\s+0\.2\.0 done/);
});

test('a compromised broker cannot install a release with a bad signature, nor an older one; a swapped pin is refused', async () => {
  const store = broker.ctx.releases.store;
  const offerFor = store.offerFor.bind(store);
  const offer = async (version: string, sig: ReleaseSignature) => {
    const { sha256, size } = await sha256File(bundles['0.2.0']!);
    const row: ReleaseRow = { version, sha256, size, manifest: sig.manifest, signature: sig.signature, ring: 'canary', publishedAt: '', publishedBy: '', rolledOutAt: null };
    store.offerFor = async () => row;
  };
  try {
    await offer('0.4.0', await sign(bundles['0.2.0']!, '0.4.0', other));
    const bad = await cli(['agent', '--once'], { launcher: true });
    assert.equal(bad.code, 0, bad.err);
    assert.equal((await deviceRow()).state, 'refused');
    assert.match((await deviceRow()).detail!, /does not verify under the release key/);
    // Validly signed, but older than what runs (the broker may hold every old release).
    await offer('0.1.5', await sign(bundles['0.2.0']!, '0.1.5'));
    await cli(['agent', '--once'], { launcher: true });
    assert.deepEqual({ state: (await deviceRow()).state, target: (await deviceRow()).targetVersion }, { state: 'refused', target: '0.1.5' });
    assert.match((await deviceRow()).detail!, /downgrades are refused/);
    // Someone who can write the home (not holding the device key) swaps the pinned key for theirs.
    const pinPath = join(env.home, RELEASE_PIN);
    const pinned = readFileSync(pinPath, 'utf8');
    writeFileSync(pinPath, JSON.stringify({ ...JSON.parse(pinned), publicKey: other.publicB64 }));
    try {
      await offer('0.4.1', await sign(bundles['0.2.0']!, '0.4.1', other));
      await cli(['agent', '--once'], { launcher: true });
      assert.deepEqual({ state: (await deviceRow()).state, target: (await deviceRow()).targetVersion }, { state: 'refused', target: '0.4.1' });
      assert.match((await deviceRow()).detail!, /altered outside Carryon/);
    } finally {
      writeFileSync(pinPath, pinned);
    }
  } finally {
    store.offerFor = offerFor;
  }
  assert.equal(current(), 'versions/0.2.0');
  assert.equal((JSON.parse((await cli(['--json', 'self-check'], { launcher: true })).out) as { version: string }).version, '0.2.0');
});

test('a release whose self-check fails is rolled back: the device keeps running the version it had', async () => {
  assert.equal((await publish(bundles['0.3.0']!, await sign(bundles['0.3.0']!, '0.3.0'), '0.3.0')).status, 201);
  assert.equal((await http.call('POST', '/v1/admin/releases/0.3.0/rollout', { ring: 'canary' }, admin)).status, 200);
  const r = await cli(['agent', '--once'], { launcher: true });
  assert.equal(r.code, 0, r.err);
  const row = await deviceRow();
  assert.deepEqual({ state: row.state, target: row.targetVersion }, { state: 'rolled-back', target: '0.3.0' });
  assert.match(row.detail!, /this build is broken/);
  assert.equal(current(), 'versions/0.2.0');
  assert.ok(!existsSync(join(root, 'versions', '0.3.0')));
  // Not tried again at the next heartbeat; the device reports the version it runs.
  await cli(['agent', '--once'], { launcher: true });
  assert.equal((await deviceRow()).runningVersion, '0.2.0');
  assert.equal((await deviceRow()).state, 'rolled-back');
  const audit = (await http.call('GET', '/v1/admin/events?limit=10000', undefined, admin)).body.events as { action: string; outcome: string; detail: string }[];
  assert.ok(audit.some((e) => e.action === 'client-update' && e.outcome === 'failed' && e.detail.startsWith('0.3.0: rolled-back')));
});

test('a release that changes its dependencies is refused: it needs a full install (laptops cannot reach npm)', async () => {
  assert.equal((await publish(bundles['0.5.0']!, await sign(bundles['0.5.0']!, '0.5.0'), '0.5.0')).status, 201);
  assert.equal((await http.call('POST', '/v1/admin/releases/0.5.0/rollout', { ring: 'all' }, admin)).status, 200);
  await cli(['agent', '--once'], { launcher: true });
  const row = await deviceRow();
  assert.deepEqual({ state: row.state, target: row.targetVersion }, { state: 'refused', target: '0.5.0' });
  assert.match(row.detail!, /changes its dependencies \(left-pad\).*needs a full install/);
  assert.equal(current(), 'versions/0.2.0');
  assert.ok(!existsSync(join(root, 'versions', '0.5.0')));
});

test('keygen writes an encrypted private key (0600) and its public half once; the broker refuses a private key as its release key', async () => {
  const dir = join(work, 'keys');
  const withPass = { CARRYON_RELEASE_PASSPHRASE: PASS };
  const made = await cli(['admin', 'releases', 'keygen', '--out', dir], { env: withPass });
  assert.equal(made.code, 0, made.err);
  assert.equal(statSync(join(dir, 'release-key.pem')).mode & 0o777, 0o600);
  assert.match(readFileSync(join(dir, 'release-key.pem'), 'utf8'), /BEGIN ENCRYPTED PRIVATE KEY/);
  assert.throws(() => loadReleasePrivateKey(readFileSync(join(dir, 'release-key.pem'), 'utf8'), 'wrong-passphrase'), /does not open/);
  const again = await cli(['admin', 'releases', 'keygen', '--out', dir], { env: withPass });
  assert.equal(again.code, 1);
  assert.match(again.err, /already holds a release key/);
  const server = await cli(['server', '--data-dir', join(work, 'srv'), '--port', '0', '--release-key', join(dir, 'release-key.pem')]);
  assert.equal(server.code, 1);
  assert.match(server.err, /is a private key: the broker takes the public half only/);
});
