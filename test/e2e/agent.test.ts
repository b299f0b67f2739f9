import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { existsSync, linkSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { chainOf } from '../../src/live/disks/disks.js';
import { mapChain } from '../../src/disk/chain.js';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { request } from 'undici';
import { runAgent } from '../../src/client/agent.js';
import { loadDevice } from '../../src/client/vault/home.js';
import { checkout, enroll, loginOnline, status, type ClientEnv } from '../../src/client/ops.js';
import { Vault } from '../../src/client/vault/vault.js';
import { unlock } from '../../src/client/vault/key-release.js';
import { laptopClock } from '../../src/client/vault/laptop-clock.js';
import { runCarryon } from '../support/laptop.js';
import { signDeviceRequest } from '../../src/core/tokens/device-auth.js';
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
  // Display and USB facts, for the admin: what this laptop can offer a desktop (no window system here: GL not probed).
  const hw = mine.latest.stats.host as unknown as { display: { windowSystem: string | null; monitors: number; gl: boolean | null }; usb: unknown[] };
  assert.equal(typeof hw.display.monitors, 'number');
  assert.ok(Array.isArray(hw.usb));

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
  // What the laptop did meanwhile (here: serve the desktop) reached the audit trail with that heartbeat.
  assert.ok((await broker.ctx.meta.listEvents({ limit: 10_000 })).some((e) => e.action === 'offline-serve' && e.actor === `device:${deviceId}`), 'offline events are audited');
  const [locked] = await status(env, 'win11');
  assert.equal(locked!.state, 'locked');
  assert.match(locked!.problem ?? '', /locked: connect to the broker/, 'status still answers, and says what to do');
  assert.deepEqual([locked!.safeOffline, locked!.dirtyBytes], [false, null], 'a locked desktop is not "safe to go offline", and its change is unknown without its keys');
  await command('unlock');
  // The broker's USB rules reach the laptop with the heartbeat: the holder of a running desktop applies them at once (run-devices.ts).
  const pol = await http.call('PATCH', '/v1/admin/policies/desktop/win11', { usbAllowed: true, usbStorageAllowed: false, usbClasses: ['03', '08'], usbDeny: ['0781:*'] }, admin);
  assert.equal(pol.status, 200, JSON.stringify(pol.body));
  await runAgent(env, { once: true });
  assert.equal((await status(env, 'win11'))[0]!.state, 'checked_out');
  // Why the running desktop was stopped went to the audit trail with the next contact.
  assert.ok((await broker.ctx.meta.listEvents({ limit: 10_000 })).some((e) => e.action === 'offline-guest-stop' && /an administrator locked this desktop: stopping `carryon serve`/.test(e.detail ?? '')), 'the stop and its reason are audited');
  const policyFile = JSON.parse(readFileSync(join((await Vault.open(env.home)).desktopDir((await held())[0]!.desktopId), 'policy.json'), 'utf8')) as unknown;
  assert.deepEqual(policyFile, { usbAllowed: true, usb: { classes: ['03', '08'], allow: [], deny: ['0781:*'], storage: false }, printingAllowed: false });

  const vault = await Vault.open(env.home);
  const before = (await vault.storedLease((await held())[0]!)).payload;
  await command('renew-lease');
  await runAgent(env, { once: true });
  assert.notEqual((await vault.storedLease((await held())[0]!)).payload, before, 'a fresh lease was stored');

  const commands = (await http.call('GET', '/v1/admin/commands', undefined, admin)).body.commands as { state: string }[];
  assert.ok(commands.every((c) => c.state === 'done'));
  const s = (await held())[0]!;
  const dir = vault.desktopDir(s.desktopId);
  const { keys } = await unlock(vault, await loadDevice(env.home), 'alice-password', s);
  const chain = chainOf(vault, s, keys, 'disk0');
  // A second link keeps the blocks after the files are deleted (as an undeleted block or a backup would).
  const left = { base: join(env.home, 'left-base.qcow2'), top: join(env.home, 'left-top.qcow2') };
  linkSync(chain.files.base, left.base);
  linkSync(chain.files.top, left.top);
  await mapChain({ ...chain, files: left }, 'base');
  await command('wipe');
  await runAgent(env, { once: true });
  assert.deepEqual(await held(), []);
  assert.equal(existsSync(dir), false);
  // The acknowledged wipe ends the check-out: the desktop is free again, and the audit and the command's result say the work is gone.
  assert.deepEqual((await http.call('GET', '/v1/admin/checkouts', undefined, admin)).body.checkouts, []);
  const desktops = (await http.call('GET', '/v1/admin/desktops', undefined, admin)).body.desktops as { name: string; checkout: unknown }[];
  assert.equal(desktops.find((d) => d.name === 'win11')!.checkout ?? null, null);
  const ended = (await broker.ctx.meta.listEvents({ limit: 10_000 })).find((e) => e.action === 'wipe-unlock');
  assert.match(ended?.detail ?? '', /ended by the wipe: the laptop's copy is erased and its changes since snapshot \S+ are lost; the desktop is available again/);
  const wipe = ((await http.call('GET', '/v1/admin/commands', undefined, admin)).body.commands as { type: string; state: string; result: string }[]).find((c) => c.type === 'wipe')!;
  assert.equal(wipe.state, 'done');
  assert.match(wipe.result, /^wipe done; check-out .* ended by the wipe/);
  await assert.rejects(mapChain({ ...chain, files: left }, 'base'), 'crypto-erase: the LUKS header is gone, the passphrase opens nothing');
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
  const [s] = await held();
  const vault = await Vault.open(env.home);
  // The agent reads the clock record without keys (a later time only locks sooner).
  writeFileSync(join(vault.desktopDir(s!.desktopId), 'clock.json'), JSON.stringify({ body: JSON.stringify({ lastSeen: new Date(Date.now() + 400 * 24 * 3600_000).toISOString(), tpm: null }), mac: '0'.repeat(64) }));
  const res2 = await runAgent(env, { once: true });
  assert.equal(res2.online, false);
  assert.equal(await vault.isLocked(s!), true);
  writeFileSync(devFile, saved);

  // Back online (finding 5): status still answers; an online login renews the lease and the
  // trusted clock (the planted record does not authenticate), and the desktop opens again.
  const [stuck] = await status(env, 'win11');
  assert.equal(stuck!.state, 'locked');
  assert.match(stuck!.problem ?? '', /clock record .* altered|carryon login/);
  await loginOnline(env);
  await runAgent(env, { once: true });
  const [open] = await status(env, 'win11');
  assert.equal(open!.problem, null, 'a renewed lease unlocks what expiry locked');
  assert.equal(open!.state, 'checked_out');

  // An administrator's lock is not lifted by a renewed lease, nor by deleting the lock record.
  await command('lock');
  await runAgent(env, { once: true });
  await loginOnline(env);
  await runAgent(env, { once: true });
  assert.equal((await status(env, 'win11'))[0]!.state, 'locked');
  rmSync(join(vault.desktopDir(s!.desktopId), 'lock.json'));
  const [still] = await status(env, 'win11');
  assert.equal(still!.state, 'locked');
  assert.match(still!.problem ?? '', /lock record is missing or was altered/);
  await command('unlock');
  await runAgent(env, { once: true });
  assert.equal((await status(env, 'win11'))[0]!.state, 'checked_out', 'the administrator\'s unlock (a record signed by the agent) opens it');
});

test('a lease that ran out while the vault was closed: setting the clock back 10 min (and putting back the unlock token) does not open it once the agent has recorded the time', async () => {
  const vault = await Vault.open(env.home);
  const [s] = await held();
  const dir = vault.desktopDir(s!.desktopId);
  const deadline = Date.parse((JSON.parse(Buffer.from((await vault.storedLease(s!)).payload, 'base64').toString('utf8')) as { deadline: string }).deadline);
  const devFile = join(env.home, 'device.json');
  const saved = readFileSync(devFile, 'utf8');
  const token = readFileSync(join(dir, 'unlock.token')); // the user's own backup of the home
  const systemNow = laptopClock.now;
  writeFileSync(devFile, saved.replace(/"brokerUrl": "[^"]+"/, '"brokerUrl": "https://127.0.0.1:1"'));
  try {
    // Offline, 5 min after the deadline: the agent records the time, and locks.
    laptopClock.now = () => deadline + 5 * 60_000;
    assert.equal((await runAgent(env, { once: true })).online, false);
    assert.equal(await vault.isLocked(s!), true);
    // The user puts the token back and sets the clock back 10 min (faketime -600): the vault's own
    // record predates the deadline, the agent's does not. The agent, on that clock too, locks again
    // by the time it recorded.
    writeFileSync(join(dir, 'unlock.token'), token);
    laptopClock.now = () => deadline - 5 * 60_000;
    await runAgent(env, { once: true });
    assert.equal(await vault.isLocked(s!), true, 'the agent locks by the time it recorded, not the system clock');
    writeFileSync(join(dir, 'unlock.token'), token);
    await assert.rejects(unlock(vault, await loadDevice(env.home), 'alice-password', s!), { code: 'lease-expired' });
    laptopClock.now = systemNow;
    // `login --offline` (in a process of its own, on today's clock) refuses as serve would, with its exit code.
    const cli = await runCarryon(env.home, ['login', '--offline']);
    assert.equal(cli.code, 3, cli.out);
    assert.match(cli.out, /win11: refused \[lease-expired\]/);
    // The agent's record deleted or altered: refused, not ignored (a vault that took one requires it).
    const record = readFileSync(join(env.home, 'agent-clock.json'));
    rmSync(join(env.home, 'agent-clock.json'));
    await assert.rejects(unlock(vault, await loadDevice(env.home), 'alice-password', s!), { code: 'clock-untrusted', message: /agent-clock\.json.* is missing/ });
    const signed = JSON.parse(record.toString()) as { payload: string; signature: string };
    const earlier = { ...(JSON.parse(Buffer.from(signed.payload, 'base64').toString()) as Record<string, unknown>), time: new Date(deadline - 60 * 60_000).toISOString() };
    writeFileSync(join(env.home, 'agent-clock.json'), JSON.stringify({ ...signed, payload: Buffer.from(JSON.stringify(earlier)).toString('base64') }));
    await assert.rejects(unlock(vault, await loadDevice(env.home), 'alice-password', s!), { code: 'clock-untrusted', message: /not signed by this device's key/ });
  } finally {
    laptopClock.now = systemNow;
    writeFileSync(devFile, saved);
  }
  // Back online: a login re-establishes broker time (both records) and renews the lease.
  await loginOnline(env);
  await runAgent(env, { once: true });
  const [open] = await status(env, 'win11');
  assert.equal(open!.problem, null);
});
