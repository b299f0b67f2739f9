import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { request } from 'undici';
import { runAgent } from '../../src/client/agent.js';
import { loadDevice } from '../../src/client/home.js';
import { checkout, enroll, status, type ClientEnv } from '../../src/client/ops.js';
import { Vault } from '../../src/client/vault.js';
import { signDeviceRequest } from '../../src/core/device-auth.js';
import { generateSigningKey } from '../../src/core/signing.js';
import { pinnedAgent } from '../../src/net/pinned-agent.js';
import type { RunningBroker } from '../../src/broker/start.js';
import { ADMIN, api, cleanup, makeImage, testBroker, type Api } from '../broker/harness.js';

process.env.CARRYON_SCRYPT_N = '1024';
let broker: RunningBroker & { dir: string };
let http: Api;
let admin: string;
let env: ClientEnv;
let deviceId: string;

before(async () => {
  broker = await testBroker();
  http = api(broker.url, broker.fingerprint);
  admin = await http.login(ADMIN.name, ADMIN.password);
  await http.call('POST', '/v1/admin/users', { name: 'alice', password: 'alice-password' }, admin);
  await http.call('POST', '/v1/admin/desktops', { name: 'win11', image: makeImage(broker.dir, 4), config: { vcpus: 1, ramMiB: 512, minRamMiB: 256 } }, admin);
  await http.call('POST', '/v1/admin/entitlements', { principalType: 'user', principal: 'alice', targetType: 'desktop', target: 'win11' }, admin);
  env = { home: join(broker.dir, 'laptop'), user: 'alice', password: async () => 'alice-password', log: () => undefined, pollMs: 20 };
  deviceId = (await enroll(env, broker.url, { fingerprint: broker.fingerprint, name: 'laptop' })).deviceId;
  await checkout(env, 'win11');
});
after(async () => {
  await http.close();
  await broker.close();
  cleanup(broker.dir);
});

const command = async (type: string) => {
  const r = await http.call('POST', `/v1/admin/devices/${deviceId}/commands`, { type, desktopId: 'win11' }, admin);
  assert.equal(r.status, 201, JSON.stringify(r.body));
};
const held = async () => (await Vault.open(env.home)).list();

test('heartbeats carry endpoint statistics; remote lock, unlock, lease renewal and wipe are applied and acknowledged', async () => {
  const res = await runAgent(env, { once: true });
  assert.equal(res.online, true);
  const devices = (await http.call('GET', '/v1/admin/devices', undefined, admin)).body.devices as { id: string; latest: { stats: { desktops: { percentLocal: number }[]; host: { cpus: number } } } }[];
  const mine = devices.find((d) => d.id === deviceId)!;
  assert.equal(mine.latest.stats.desktops[0]!.percentLocal, 100);
  assert.ok(mine.latest.stats.host.cpus >= 1);

  // A lock reaches a desktop that is running now: the process holding its disk is stopped.
  const served = spawn(process.execPath, [join(process.cwd(), 'dist', 'src', 'cli', 'main.js'), 'serve', 'win11'], {
    env: { ...process.env, CARRYON_HOME: env.home, CARRYON_USER: 'alice', CARRYON_PASSWORD: 'alice-password' }, stdio: ['ignore', 'pipe', 'pipe'],
  });
  const servedExit = new Promise<number | null>((r) => served.once('exit', (code) => r(code)));
  await new Promise<void>((resolve, reject) => {
    let out = '';
    const t = setTimeout(() => reject(new Error(`serve did not start: ${out}`)), 30_000);
    served.stdout!.on('data', (d: Buffer) => { out += d.toString(); if (/nbd\+unix/.test(out)) { clearTimeout(t); resolve(); } });
    served.once('exit', () => { clearTimeout(t); reject(new Error(`serve exited: ${out}`)); });
  });
  await command('lock');
  assert.equal((await runAgent(env, { once: true })).commands, 1);
  assert.equal(await Promise.race([servedExit.then(() => 'stopped'), new Promise((r) => setTimeout(() => r('still running'), 5000))]), 'stopped');
  const [locked] = await status(env, 'win11');
  assert.equal(locked!.state, 'locked');
  assert.match(locked!.problem ?? '', /locked: connect to the broker/, 'status still answers, and says what to do');
  await command('unlock');
  await runAgent(env, { once: true });
  assert.equal((await status(env, 'win11'))[0]!.state, 'checked_out');

  const before = (await held())[0]!.lease.payload;
  await new Promise((r) => setTimeout(r, 1100));
  await command('renew-lease');
  await runAgent(env, { once: true });
  assert.notEqual((await held())[0]!.lease.payload, before, 'a fresh lease was stored');

  const commands = (await http.call('GET', '/v1/admin/commands', undefined, admin)).body.commands as { state: string }[];
  assert.ok(commands.every((c) => c.state === 'done'));
  await command('wipe');
  await runAgent(env, { once: true });
  assert.deepEqual(await held(), []);
});

test('forged agent signatures are refused; a lease that runs out without contact locks the desktop', async () => {
  const device = await loadDevice(env.home);
  const agent = pinnedAgent(broker.fingerprint);
  const body = JSON.stringify({ host: { cpus: 1, ramBytes: 1, freeDiskBytes: 1 }, vaultBytes: 0, desktops: [] });
  const forged = signDeviceRequest(generateSigningKey().privateKey, device.info.deviceId!, 'POST', '/v1/agent/heartbeat', body);
  const res = await request(`${broker.url}/v1/agent/heartbeat`, { method: 'POST', dispatcher: agent, headers: { 'content-type': 'application/json', ...forged }, body });
  assert.equal(res.statusCode, 401);
  await res.body.dump();
  await agent.close();

  // A second check-out (the first was wiped by force-unlock below), then no broker and a late clock.
  const list = (await http.call('GET', '/v1/admin/checkouts', undefined, admin)).body.checkouts as { id: string }[];
  for (const c of list) await http.call('POST', `/v1/admin/checkouts/${c.id}/force-unlock`, {}, admin);
  await checkout(env, 'win11');
  const devFile = join(env.home, 'device.json');
  const saved = readFileSync(devFile, 'utf8');
  writeFileSync(devFile, saved.replace(/"brokerUrl": "[^"]+"/, '"brokerUrl": "https://127.0.0.1:1"'));
  writeFileSync(join(env.home, 'clock.json'), JSON.stringify({ lastSeen: new Date(Date.now() + 400 * 24 * 3600_000).toISOString() }));
  const res2 = await runAgent(env, { once: true });
  assert.equal(res2.online, false);
  assert.equal((await held())[0]!.locked, true);
  writeFileSync(devFile, saved);
});
