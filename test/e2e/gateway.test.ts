import assert from 'node:assert/strict';
import { spawn, execFileSync, type ChildProcess } from 'node:child_process';
import { cpSync, mkdtempSync, readFileSync, writeFileSync } from 'node:fs';
import { createConnection } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { connect as tlsConnect, createSecureContext, createServer as createTlsServer, type Server as TlsServer } from 'node:tls';
import { after, before, test } from 'node:test';
import { runAgent } from '../../src/client/agent.js';
import { templatesDir } from '../../src/live/disks/disks.js';
import { checkout, enroll, release, upload, type ClientEnv } from '../../src/client/ops.js';
import { loadOrCreateTls } from '../../src/net/tls-cert.js';
import type { TransferServer } from '../../src/transfer/server.js';
import { startStandaloneTransfer } from '../../src/transfer/standalone.js';
import { ADMIN, api, cleanup, makeImage, testBroker, transferStore, type Api, type TestBroker } from '../broker/harness.js';
import { writeDesktop } from '../support/laptop.js';
import { freePort } from '../support/ports.js';
import { HAPROXY } from '../support/haproxy.js';

/**
 * Laptops on the internet: haproxy (started here, on 127.0.0.1) is the only address the laptop
 * knows; the broker listens on 127.0.0.2 and two transfer servers on 127.0.0.3. TLS passes
 * through the gateway, routed by SNI, and the laptop pins each server's own certificate.
 * carryon-test: sqlite-only — the subject is the gateway and the laptop; the gateway's record in
 * the broker's database is tested on both engines in test/transfer/scheduler.test.ts.
 */
process.env.CARRYON_SCRYPT_N = '1024';
const DOMAIN = 'gw.carryon.test';
let broker: TestBroker;
let http: Api;
let admin: string;
let gwPort: number;
let gwDir: string;
let haproxy: ChildProcess;
const transfers = new Map<string, TransferServer & { heartbeat(): Promise<void> }>();
let env: ClientEnv;

const gatewayUrl = () => `https://127.0.0.1:${gwPort}`;
const statsSocket = () => join(gwDir, 'haproxy.sock');

/** haproxy's own counters (`show stat` on its stats socket), per proxy: total sessions, requests denied. */
async function haproxyStats(): Promise<Record<string, { stot: number; dreq: number }>> {
  const csv = await new Promise<string>((resolve, reject) => {
    let out = '';
    const s = createConnection(statsSocket(), () => s.end('show stat\n'));
    s.setEncoding('utf8').on('data', (d: string) => (out += d)).once('end', () => resolve(out)).once('error', reject);
  });
  const [header, ...rows] = csv.trim().split('\n');
  const cols = header!.replace(/^# /, '').split(',');
  const at = (name: string) => cols.indexOf(name);
  return Object.fromEntries(rows.map((r) => r.split(',')).filter((r) => ['BACKEND', 'FRONTEND'].includes(r[at('svname')]!))
    .map((r) => [r[at('pxname')]!, { stot: Number(r[at('stot')]), dreq: Number(r[at('dreq')] || 0) }]));
}

/** Total sessions per backend. */
async function backendSessions(): Promise<Record<string, number>> {
  return Object.fromEntries(Object.entries(await haproxyStats()).filter(([k]) => k.startsWith('be_')).map(([k, v]) => [k, v.stot]));
}

async function startHaproxy(): Promise<void> {
  const made = await http.call('POST', '/v1/admin/gateway/config', { bind: `127.0.0.1:${gwPort}`, statsSocket: statsSocket() }, admin);
  assert.equal(made.status, 200, JSON.stringify(made.body));
  const cfg = join(gwDir, 'haproxy.cfg');
  writeFileSync(cfg, String(made.body.config));
  execFileSync(HAPROXY, ['-c', '-q', '-f', cfg]);
  haproxy = spawn(HAPROXY, ['-db', '-f', cfg], { stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  haproxy.stderr!.setEncoding('utf8').on('data', (d: string) => (stderr += d));
  for (let i = 0; ; i++) {
    try {
      await backendSessions();
      return;
    } catch {
      if (haproxy.exitCode !== null || i > 100) throw new Error(`haproxy did not start: ${stderr}`);
      await new Promise((r) => setTimeout(r, 50));
    }
  }
}

before(async () => {
  gwPort = await freePort();
  gwDir = mkdtempSync(join(tmpdir(), 'carryon-gateway-'));
  broker = await testBroker(undefined, { host: '127.0.0.2', embeddedTransferSlots: 0, gateway: { address: `127.0.0.1:${gwPort}`, domain: DOMAIN } });
  http = api(broker.url, broker.fingerprint);
  admin = await http.login(ADMIN.name, ADMIN.password);
  for (const id of ['ts-a', 'ts-b']) {
    transfers.set(id, await startStandaloneTransfer({
      id, brokerUrl: broker.url, brokerFingerprint: broker.fingerprint, secret: broker.ctx.settings.transferSecret, slots: 2, heartbeatSec: 1,
      storeDir: transferStore(broker), masterKeyFile: join(broker.dir, 'master.key'), host: '127.0.0.3', port: 0, tlsDir: join(broker.dir, `${id}-tls`),
    }));
  }
  await http.call('POST', '/v1/admin/users', { name: 'alice', password: 'alice-password' }, admin);
  const image = makeImage(broker.dir, 16);
  for (const name of ['d1', 'd2', 'd3', 'd4']) {
    // d2 and d3 are not clones: the laptop holds d1 (and then d2), whose chunks a clone would copy locally, so nothing would travel to resume or cancel.
    const own = name === 'd2' || name === 'd3' ? makeImage(broker.dir, 16, `${name}.raw`) : null;
    const r = await http.call('POST', '/v1/admin/desktops', name === 'd1' || own ? { name, image: own ?? image, config: { vcpus: 1, ramMiB: 512, minRamMiB: 256 } } : { name, cloneOf: 'd1' }, admin);
    assert.equal(r.status, 201, JSON.stringify(r.body));
    await http.call('POST', '/v1/admin/entitlements', { principalType: 'user', principal: 'alice', targetType: 'desktop', target: name }, admin);
  }
  await startHaproxy();
  env = { home: join(broker.dir, 'laptop'), user: 'alice', password: async () => 'alice-password', log: () => undefined, pollMs: 20 };
  // The laptop is given the gateway's address only, and pins the broker's own certificate through it.
  await enroll(env, gatewayUrl(), { fingerprint: broker.fingerprint, name: 'laptop' });
});
after(async () => {
  haproxy?.kill();
  for (const t of transfers.values()) await t.close();
  await http.close();
  await broker.close();
  cleanup(broker.dir);
  cleanup(gwDir);
});

/** The server each job of the run went to, in order (the scheduler's record). */
const jobServers = async () => (await broker.ctx.scheduler.history()).map((j) => j.server);

test('enrol, check out, agent heartbeat and check in, all through the gateway: haproxy counts the laptop\'s connections on the broker and transfer backends', async () => {
  const device = JSON.parse(readFileSync(join(env.home, 'device.json'), 'utf8')) as { brokerUrl: string; brokers?: unknown };
  assert.equal(device.brokerUrl, gatewayUrl());
  assert.equal(device.brokers, undefined, 'the gateway is the one address the laptop knows');
  const before = await backendSessions();
  await checkout(env, 'd1');
  assert.equal((await runAgent(env, { once: true })).online, true);
  await writeDesktop(env, 'd1', [{ offset: 0, data: Buffer.alloc(8192, 'through the gateway') }]);
  const ci = await upload(env, 'd1', 'checkin');
  assert.equal(ci.changedChunks, 1);
  const after = await backendSessions();
  assert.ok(after.be_broker! > before.be_broker!, `broker backend: ${JSON.stringify(after)}`);
  const used = (await jobServers()).filter((s): s is string => s !== null);
  assert.equal(used.length, 2, 'a check-out and a check-in job');
  for (const id of new Set(used)) {
    const key = `be_t_${id.replace(/-/g, '_')}`;
    assert.ok(after[key]! > before[key]!, `the laptop reached ${id} through the gateway: ${JSON.stringify(before)} → ${JSON.stringify(after)}`);
  }
});

test('a check-out cut off resumes through the gateway; another is cancelled', async () => {
  const stop = new AbortController();
  await assert.rejects(checkout({ ...env, signal: stop.signal, onProgress: (_l, p) => p.chunksDone >= 5 && stop.abort() }, 'd2'));
  const done = await checkout(env, 'd2');
  assert.ok(done.chunksMoved > 0 && done.chunksMoved < 64, `the rerun fetched only the rest: ${done.chunksMoved} chunks`);
  const cancel = new AbortController();
  await assert.rejects(checkout({ ...env, signal: cancel.signal, onProgress: (_l, p) => p.chunksDone >= 5 && cancel.abort() }, 'd3'));
  await release(env, 'd3', 'cancel');
  const checkouts = (await http.call('GET', '/v1/admin/checkouts', undefined, admin)).body.checkouts as { desktopId: string }[];
  assert.equal(checkouts.length, 1, 'd2 is held, d3 was cancelled');
});

test('a laptop enrolled inside keeps the broker\'s gateway route from the enrolment answer, and fails over to it outside', async () => {
  const inside: ClientEnv = { ...env, home: join(broker.dir, 'laptop-inside') };
  // The QEMU-made layer templates of the first laptop (enrolment's slow one-time step) serve this one too
  // (the test runner already shares one directory between all laptops).
  if (templatesDir(env.home) !== templatesDir(inside.home)) cpSync(templatesDir(env.home), templatesDir(inside.home), { recursive: true });
  await enroll(inside, broker.url, { fingerprint: broker.fingerprint, name: 'laptop-inside' });
  const file = join(inside.home, 'device.json');
  const device = JSON.parse(readFileSync(file, 'utf8')) as { brokers: { url: string; fingerprint: string; servername?: string }[] };
  assert.deepEqual(device.brokers, [{ url: broker.url, fingerprint: broker.fingerprint }, { url: gatewayUrl(), fingerprint: broker.fingerprint, servername: `broker.${DOMAIN}` }]);
  // Outside: the inside address is not reachable (nothing listens there), the gateway is.
  device.brokers[0]!.url = 'https://127.0.0.2:1';
  writeFileSync(file, JSON.stringify(device));
  const before = (await backendSessions()).be_broker!;
  assert.equal((await runAgent(inside, { once: true })).online, true);
  assert.ok((await backendSessions()).be_broker! > before, 'through the gateway, by the broker\'s name');
});

test('a ClientHello with a name the gateway does not route, or no TLS at all, is closed by haproxy', async () => {
  const closed = (servername: string) => new Promise<string>((resolve) => {
    const s = tlsConnect({ host: '127.0.0.1', port: gwPort, servername, rejectUnauthorized: false });
    s.once('secureConnect', () => (s.destroy(), resolve('handshake')));
    s.once('error', (err: NodeJS.ErrnoException) => resolve(err.code ?? err.message));
  });
  assert.notEqual(await closed(`nope.transfer.${DOMAIN}`), 'handshake');
  const denied = (await haproxyStats()).carryon!.dreq;
  const plain = await new Promise<string>((resolve) => {
    let got = '';
    const s = createConnection(gwPort, '127.0.0.1', () => s.write('GET /v1/broker HTTP/1.0\r\n\r\n'));
    s.setEncoding('utf8').on('data', (d: string) => (got += d)).once('close', () => resolve(got)).once('error', () => undefined);
  });
  assert.equal(plain, '', 'plain HTTP is closed without an answer');
  assert.equal((await haproxyStats()).carryon!.dreq, denied + 1, 'by haproxy itself (denied), not passed on');
  assert.equal(await closed(`ts-a.transfer.${DOMAIN}`), 'handshake', 'a routed name reaches the server');
});

test('a transfer server swapped behind the gateway for one with another certificate is refused by the laptop: the pin holds end to end', async () => {
  // Both servers are idle and have 2 slots: the next job goes to ts-a (ties: lowest id).
  const real = transfers.get('ts-a')!;
  const port = Number(new URL(real.url).port);
  await real.close();
  transfers.delete('ts-a');
  const other = await loadOrCreateTls({ dir: join(gwDir, 'impostor') });
  const seen: string[] = [];
  // The name is taken from the ClientHello (SNICallback), not from a finished handshake: the laptop
  // refuses the certificate and drops the connection, so the impostor may never see the handshake end.
  const context = createSecureContext({ cert: other.cert, key: other.key });
  const impostor: TlsServer = createTlsServer({ cert: other.cert, key: other.key, SNICallback: (name, cb) => (seen.push(name), cb(null, context)) }, (s) => s.end());
  impostor.on('tlsClientError', () => undefined); // the laptop's refusal, expected
  await new Promise<void>((r) => impostor.listen(port, '127.0.0.3', r));
  try {
    const beforeStats = await backendSessions();
    await assert.rejects(checkout(env, 'd4'), (err: Error & { code?: string }) => /pin-mismatch|does not match the pinned/.test(`${err.code} ${err.message}`) || assert.fail(err));
    assert.equal((await jobServers()).at(-1), 'ts-a', 'the job went to the swapped server');
    assert.ok(seen.includes(`ts-a.transfer.${DOMAIN}`), `the impostor got the laptop's connection, routed by name (${seen.join(', ')})`);
    assert.ok((await backendSessions()).be_t_ts_a! > beforeStats.be_t_ts_a!);
  } finally {
    await new Promise((r) => impostor.close(r));
  }
});

test('the gateway config records its server set: a server added makes it out of date (admin transfers says so), regenerating makes it current', async () => {
  const status = async () => (await http.call('GET', '/v1/admin/transfers', undefined, admin)).body.gateway as { upToDate: boolean; routes: { id: string; names: string[] }[] };
  assert.equal((await status()).upToDate, true);
  const reg = await http.call('POST', '/v1/transfer-servers/register', { id: 'ts-c', url: 'https://127.0.0.3:9', slots: 1, fingerprint: 'c'.repeat(64) });
  assert.equal(reg.status, 401, 'without the secret');
  const { request } = await import('undici');
  const { pinnedAgent } = await import('../../src/net/pinned-agent.js');
  const agent = pinnedAgent(broker.fingerprint);
  try {
    const r = await request(`${broker.url}/v1/transfer-servers/register`, {
      method: 'POST', dispatcher: agent, headers: { 'content-type': 'application/json', 'x-carryon-transfer-secret': broker.ctx.settings.transferSecret },
      body: JSON.stringify({ id: 'ts-c', url: 'https://127.0.0.3:9', slots: 1, fingerprint: 'c'.repeat(64) }),
    });
    assert.equal(r.statusCode, 200, await r.body.text());
  } finally {
    await agent.close();
  }
  const stale = await status();
  assert.equal(stale.upToDate, false);
  assert.deepEqual(stale.routes.find((r) => r.id === 'ts-c')?.names, [`ts-c.transfer.${DOMAIN}`]);
  // The admin CLI makes it again (what an operator runs), and haproxy accepts what it wrote.
  const out = join(gwDir, 'new.cfg');
  const cli = spawn(process.execPath, [join(process.cwd(), 'dist', 'src', 'cli', 'main.js'), 'admin', 'gateway-config', '--out', out, '--bind', `127.0.0.1:${gwPort}`], {
    env: { ...process.env, CARRYON_URL: broker.url, CARRYON_FINGERPRINT: broker.fingerprint, CARRYON_USER: ADMIN.name, CARRYON_PASSWORD: ADMIN.password }, stdio: ['ignore', 'pipe', 'pipe'],
  });
  let printed = '';
  cli.stdout!.on('data', (d: Buffer) => (printed += d.toString()));
  cli.stderr!.on('data', (d: Buffer) => (printed += d.toString()));
  assert.equal(await new Promise((r) => cli.once('exit', r)), 0, printed);
  assert.match(readFileSync(out, 'utf8'), /req_ssl_sni -i ts-c\.transfer\.gw\.carryon\.test/);
  execFileSync(HAPROXY, ['-c', '-q', '-f', out]);
  assert.equal((await status()).upToDate, true);
});
