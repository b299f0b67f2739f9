// carryon-test: sqlite-only (the CLI and the laptop are the subject; lifecycle.test.ts runs the same check-in, cut off and resumed, on PostgreSQL)
import assert from 'node:assert/strict';
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { after, before, test } from 'node:test';
import { checkout, type ClientEnv } from '../../src/client/ops.js';
import type { RunningBroker } from '../../src/broker/start.js';
import { exportCurrentSnapshot } from '../../src/broker/desktops/snapshot-image.js';
import { ADMIN, api, cleanup, makeImage, testBroker, type Api } from '../broker/harness.js';

const run = promisify(execFile);
const CLI = join(process.cwd(), 'dist', 'src', 'cli', 'main.js');
let broker: RunningBroker & { dir: string };
let http: Api;
let image: string;
let home: string;
let cliEnv: NodeJS.ProcessEnv;

function carryon(args: string[]) {
  return run(process.execPath, [CLI, ...args], { env: cliEnv, maxBuffer: 16 << 20 });
}

function spawnCarryon(args: string[]): ChildProcess {
  return spawn(process.execPath, [CLI, ...args], { env: cliEnv, stdio: ['ignore', 'pipe', 'pipe'] });
}

async function waitForOutput(child: ChildProcess, re: RegExp): Promise<string> {
  let out = '';
  return new Promise((resolve, reject) => {
    const t = setTimeout(() => reject(new Error(`timed out waiting for ${re}: ${out}`)), 30_000);
    const on = (d: Buffer) => {
      out += d.toString();
      if (re.test(out)) { clearTimeout(t); resolve(out); }
    };
    child.stdout!.on('data', on);
    child.stderr!.on('data', on);
    child.on('exit', () => { clearTimeout(t); reject(new Error(`exited early: ${out}`)); });
  });
}

/** Signals a child and waits for it to end; a child that already ended returns at once. */
async function stopChild(child: ChildProcess, signal: NodeJS.Signals): Promise<{ code: number | null; signal: NodeJS.Signals | null }> {
  const ended = () => ({ code: child.exitCode, signal: child.signalCode });
  if (child.exitCode !== null || child.signalCode !== null) return ended();
  const done = new Promise<void>((r) => child.once('exit', () => r()));
  child.kill(signal);
  await done;
  return ended();
}

async function serverDisk(): Promise<Buffer> {
  const out = join(broker.dir, `server-${randomBytes(3).toString('hex')}.raw`);
  await exportCurrentSnapshot(broker.ctx, 'win11', out);
  return readFileSync(out);
}

before(async () => {
  broker = await testBroker();
  http = api(broker.url, broker.fingerprint);
  const admin = await http.login(ADMIN.name, ADMIN.password);
  await http.call('POST', '/v1/admin/users', { name: 'alice', password: 'alice-password' }, admin);
  image = makeImage(broker.dir, 16);
  assert.equal((await http.call('POST', '/v1/admin/desktops', { name: 'win11', image, config: { vcpus: 2, ramMiB: 1024, minRamMiB: 256 } }, admin)).status, 201);
  await http.call('POST', '/v1/admin/entitlements', { principalType: 'user', principal: 'alice', targetType: 'desktop', target: 'win11' }, admin);
  home = join(broker.dir, 'cli-home');
  cliEnv = { ...process.env, CARRYON_HOME: home, CARRYON_USER: 'alice', CARRYON_PASSWORD: 'alice-password', CARRYON_SCRYPT_N: '1024' };
});
after(async () => {
  await http.close();
  await broker.close();
  cleanup(broker.dir);
});

test('CLI: enroll, check-out, write through NBD with qemu-io, check-in killed mid-way then completed', async () => {
  const bad = await carryon(['enroll', broker.url, '--fingerprint', 'ab'.repeat(32)]).catch((e: { stderr: string; code: number }) => e);
  assert.match((bad as { stderr: string }).stderr, /not the expected/);
  const enrolled = await carryon(['enroll', broker.url, '--fingerprint', broker.fingerprint, '--name', 'laptop']);
  // The seconds it takes are not silent: each phase says what it does, on stderr.
  assert.match(enrolled.stderr, /logging in as alice…\n.*creating the device key.*\n.*registering this device.*\n.*preparing encrypted layer templates/s);
  const list = JSON.parse((await carryon(['list', '--json'])).stdout) as { name: string; actions: string[] }[];
  assert.deepEqual(list.map((d) => [d.name, d.actions]), [['win11', ['checkout']]]);
  await carryon(['checkout', 'win11', '--quiet']);
  const st = JSON.parse((await carryon(['status', 'win11', '--json'])).stdout) as { safeOffline: boolean; state: string }[];
  assert.deepEqual([st[0]!.state, st[0]!.safeOffline], ['checked_out', true]);
  const dry = (await carryon(['run', 'win11', '--dry-run'])).stdout;
  assert.match(dry, /qemu-system-x86_64 .*-blockdev .*"driver":"qcow2".*top\.qcow2.*"encrypt":\{"format":"luks"/);
  assert.match(dry, /-smp 1 |-smp \d+ /);
  const events = JSON.parse(readFileSync(join(home, 'events.json'), 'utf8')) as { action: string }[];
  assert.equal(events[events.length - 1]!.action, 'run-dry-run', 'a dry run is not reported as the desktop having run');
  // stdout's reader gone (`carryon status | head -1`): a quiet end, no EPIPE stack trace.
  const piped = spawnCarryon(['status']);
  piped.stdout!.destroy();
  let piperr = '';
  piped.stderr!.on('data', (d: Buffer) => (piperr += d.toString()));
  const pipeEnd = await new Promise<number | null>((r) => piped.once('exit', (code) => r(code)));
  assert.deepEqual([pipeEnd, piperr], [0, '']);

  const serve = spawnCarryon(['serve', 'win11']);
  const out = await waitForOutput(serve, /nbd\+unix:\/\/\/disk0\?socket=\S+/);
  const uri = /nbd\+unix:\/\/\/disk0\?socket=\S+/.exec(out)![0];
  // A replica of the served (running) desktop is taken live, by the serve process that holds it.
  const early = randomBytes(64 * 1024);
  const earlyFile = join(broker.dir, 'early.bin');
  writeFileSync(earlyFile, early);
  await run('qemu-io', ['-f', 'raw', '-c', `write -s ${earlyFile} 5M 64k`, '-c', 'flush', uri]);
  const liveReplica = await carryon(['replicate', 'win11', '--json']);
  // Random (incompressible) data, so the rate-limited check-in below takes seconds, not milliseconds.
  const written = randomBytes(3 * 1024 * 1024);
  const source = join(broker.dir, 'written.bin');
  writeFileSync(source, written);
  await run('qemu-io', ['-f', 'raw', '-c', `write -s ${source} 100k 3M`, '-c', 'flush', uri]);
  await stopChild(serve, 'SIGTERM');
  // Asserted once serve has stopped (a failure must not leave it running).
  assert.match(out, /unlocking its keys…\n.*starting qemu-storage-daemon/s, 'serve says what it is doing before the socket is up');
  assert.equal(JSON.parse(liveReplica.stdout).replicaKind, 'crash-consistent');
  const expected = readFileSync(image);
  early.copy(expected, 5 * 1024 * 1024);
  written.copy(expected, 100 * 1024);
  const dirty = JSON.parse((await carryon(['status', 'win11', '--json'])).stdout) as { dirtyBytes: number }[];
  assert.ok(dirty[0]!.dirtyBytes >= 3 * 1024 * 1024);

  // Kill the client in the middle of the check-in, then run it again. The kill waits for the upload's
  // first progress line (not for a time: the load would decide which case is tested); at 1 MiB/s the
  // 3 MiB upload has seconds left then, so the commit cannot have happened.
  const ci = spawnCarryon(['checkin', 'win11', '--limit-rate', '1M']);
  await waitForOutput(ci, /\d+\/\d+ chunks/);
  await stopChild(ci, 'SIGKILL');
  const held = JSON.parse((await carryon(['status', '--json'])).stdout) as { desktop: string; state: string }[];
  assert.ok(held.some((d) => d.desktop === 'win11' && d.state !== 'parked'), 'killed mid-upload: still checked out');
  // Online, the vault opens with the broker's unlock share, not the password's scrypt (client/vault/online-unlock.ts).
  const again = await run(process.execPath, [CLI, 'checkin', 'win11', '--json'], { env: { ...cliEnv, CARRYON_TRACE: '1' }, maxBuffer: 16 << 20 });
  assert.ok(JSON.parse(again.stdout).snapshotId);
  const spans = again.stderr.split('\n').filter((l) => l.startsWith('carryon-trace ')).map((l) => l.split(' ')[1]);
  assert.ok(spans.includes('vault-keys(online)') && !spans.some((n) => n?.includes('kdf')), `the check-in opened the vault online, no KDF: ${spans.join(' ')}`);
  assert.ok((await serverDisk()).equals(expected), "the server's new snapshot holds the qemu-io write");
});

test('boot while data is in flight: nbdcopy of the whole export with 10% local is byte-identical', async () => {
  // A second laptop with an empty vault (the first one keeps every blob it has seen).
  home = join(broker.dir, 'cli-home-2');
  cliEnv = { ...cliEnv, CARRYON_HOME: home };
  await carryon(['enroll', broker.url, '--fingerprint', broker.fingerprint, '--name', 'laptop-2']);
  const env: ClientEnv = { home, user: 'alice', password: async () => 'alice-password', log: () => undefined, pollMs: 20 };
  // Export is refused unless policy allows it (the first laptop's check-out had the default, false).
  const admin = await http.login(ADMIN.name, ADMIN.password);
  assert.equal((await http.call('PUT', '/v1/admin/policies/desktop/win11', { exportAllowed: true }, admin)).status, 200);
  const abort = new AbortController();
  await assert.rejects(checkout({ ...env, signal: abort.signal, onProgress: (_l, p) => p.chunksDone >= p.chunksTotal / 10 && abort.abort() }, 'win11'));
  const st = JSON.parse((await carryon(['status', 'win11', '--json'])).stdout) as { percentLocal: number; safeOffline: boolean; state: string }[];
  assert.equal(st[0]!.state, 'transferring');
  assert.ok(st[0]!.percentLocal < 50, `only ${st[0]!.percentLocal}% local`);
  assert.equal(st[0]!.safeOffline, false);
  // kill -9 of a check-out in the middle: no helper process survives it, and serving and the later rerun still end byte-identical.
  const killed = spawnCarryon(['checkout', 'win11', '--limit-rate', '1M']);
  await new Promise((r) => setTimeout(r, 1500));
  await stopChild(killed, 'SIGKILL');
  await new Promise((r) => setTimeout(r, 200));
  const daemons = (await run('pgrep', ['-f', `qemu-storage-daemon.*${home}`]).catch(() => ({ stdout: '' }))).stdout.trim();
  assert.equal(daemons, '', 'qemu-storage-daemon died with its client');
  const serve = spawnCarryon(['serve', 'win11']);
  const out = await waitForOutput(serve, /nbd\+unix:\/\/\/disk0\?socket=\S+/);
  const uri = /nbd\+unix:\/\/\/disk0\?socket=\S+/.exec(out)![0];
  const copy = join(broker.dir, 'inflight.raw');
  await run('nbdcopy', [uri, copy]);
  await stopChild(serve, 'SIGTERM');
  assert.ok(readFileSync(copy).equals(await serverDisk()));
  await carryon(['checkout', 'win11', '--quiet']);
  const done = JSON.parse((await carryon(['status', 'win11', '--json'])).stdout) as { percentLocal: number; safeOffline: boolean }[];
  assert.deepEqual([done[0]!.percentLocal, done[0]!.safeOffline], [100, true]);
  const exported = join(broker.dir, 'after-kill.raw');
  await carryon(['export', 'win11', exported]);
  assert.ok(readFileSync(exported).equals(await serverDisk()), 'byte-identical after a kill -9 mid-check-out');
  await carryon(['rollback', 'win11']);
});

test('a check-out stopped by `carryon cancel` says truly what becomes of its data: kept as a parked copy, not as a check-out to resume', async () => {
  // The rollback above parked win11: without that copy the check-out is long enough to cancel.
  await carryon(['discard', 'win11', '--yes']).catch(() => undefined);
  const child = spawnCarryon(['checkout', 'win11', '--limit-rate', '1M']);
  let err = '';
  child.stderr!.on('data', (d: Buffer) => (err += d.toString()));
  await waitForOutput(child, /chunks/);
  await new Promise((r) => setTimeout(r, 1500)); // a durable group (one a second) before the cancel
  const exited = new Promise<number | null>((r) => child.once('exit', (code) => r(code)));
  assert.match((await carryon(['cancel', 'win11'])).stdout, /win11: cancelled/);
  assert.equal(await exited, 1);
  assert.match(err, /stopped by `carryon cancel win11`: the desktop is unlocked; what arrived stays on this laptop as an encrypted parked copy/);
  assert.doesNotMatch(err, /run the same command again to resume/);
  const left = JSON.parse((await carryon(['status', '--json'])).stdout) as { desktop: string; state: string }[];
  assert.deepEqual(left.map((d) => [d.desktop, d.state]), [['win11', 'parked']], 'no checked-out desktop left on the laptop; --json lists the parked copy as the text does');
  assert.match((await carryon(['status'])).stdout, /win11: parked copy/);
});
