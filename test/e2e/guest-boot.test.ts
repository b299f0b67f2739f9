import assert from 'node:assert/strict';
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { mkdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { after, before, test } from 'node:test';
import type { RunningBroker } from '../../src/broker/start.js';
import { exportCurrentSnapshot } from '../../src/broker/snapshot-image.js';
import { ADMIN, api, cleanup, testBroker, type Api } from '../broker/harness.js';
import { buildInitramfs, guestAppend, guestKernel, guestQemuArgs, makeExt4Image, parseGuestSerial, readExt4File, type GuestAction } from '../support/guest.js';

// A real Linux guest (Debian kernel, busybox initramfs) boots from a checked-out desktop with
// `carryon run` (TCG), writes a file, and the check-in carries it to the broker's new snapshot.
const run = promisify(execFile);
const CLI = join(process.cwd(), 'dist', 'src', 'cli', 'main.js');
let broker: RunningBroker & { dir: string };
let http: Api;
let initrd: string;
let kernel: string;
let cliEnv: NodeJS.ProcessEnv;

const carryon = (args: string[]) => run(process.execPath, [CLI, ...args], { env: cliEnv, maxBuffer: 16 << 20, timeout: 240_000 });

async function serverFile(desktop: string, path: string): Promise<string> {
  const out = join(broker.dir, `${desktop}-snapshot.raw`);
  await exportCurrentSnapshot(broker.ctx, desktop, out);
  return (await readExt4File(out, path)).toString('utf8');
}

/** `carryon run` with the test kernel; the guest does `actions`, powers off, and QEMU exits. */
async function runGuest(desktop: string, actions: GuestAction[], extra: string[] = []) {
  const serial = join(broker.dir, `${desktop}-${Date.now()}.serial`);
  const qemuArgs = guestQemuArgs({ kernel, initrd, append: guestAppend(actions, { waitS: 60 }) });
  const res = await carryon([...extra, 'run', desktop, '--accel', 'tcg', '--display', 'none', '--serial', serial, ...qemuArgs.map((a) => `--qemu-arg=${a}`)]);
  const report = parseGuestSerial(readFileSync(serial, 'utf8'));
  assert.ok(report.done, `the guest finished: ${report.failure ?? ''}\n${res.stderr}`);
  return { report, stderr: res.stderr };
}

// Incompressible: at --limit-rate 2M its 8 MiB keep the check-out in flight for seconds (a filled buffer crossed the wire in 5 KiB).
const bigFile = randomBytes(8 << 20);

before(async () => {
  kernel = guestKernel();
  broker = await testBroker();
  http = api(broker.url, broker.fingerprint);
  const admin = await http.login(ADMIN.name, ADMIN.password);
  await http.call('POST', '/v1/admin/users', { name: 'alice', password: 'alice-password' }, admin);
  mkdirSync(join(broker.dir, 'guest'));
  initrd = await buildInitramfs(join(broker.dir, 'guest'));
  for (const name of ['office', 'travel']) {
    const image = join(broker.dir, `${name}.raw`);
    await makeExt4Image(image, 48, { 'etc/motd': `welcome to ${name}\n`, 'data/big.bin': bigFile });
    const r = await http.call('POST', '/v1/admin/desktops', { name, image, config: { vcpus: 1, ramMiB: 256, minRamMiB: 128 } }, admin);
    assert.equal(r.status, 201, JSON.stringify(r.body));
    await http.call('POST', '/v1/admin/entitlements', { principalType: 'user', principal: 'alice', targetType: 'desktop', target: name }, admin);
  }
  const home = join(broker.dir, 'home');
  cliEnv = { ...process.env, CARRYON_HOME: home, CARRYON_USER: 'alice', CARRYON_PASSWORD: 'alice-password', CARRYON_SCRYPT_N: '1024' };
  await carryon(['enroll', broker.url, '--fingerprint', broker.fingerprint, '--name', 'laptop']);
});
after(async () => {
  await http.close();
  await broker?.close();
  if (broker) cleanup(broker.dir);
});

test('a real Linux guest boots from a checked-out desktop with carryon run; its file is in the new snapshot after check-in', async () => {
  await carryon(['checkout', 'office', '--quiet']);
  const { report } = await runGuest('office', [{ read: '/etc/motd' }, { write: '/home/alice/notes.txt', content: 'written-offline-on-the-laptop' }]);
  assert.equal(report.reads.get('/etc/motd')?.toString('utf8'), 'welcome to office\n', 'the guest reads the checkpoint');
  const st = JSON.parse((await carryon(['status', 'office', '--json'])).stdout) as { dirtyBytes: number }[];
  assert.ok(st[0]!.dirtyBytes > 0, 'the guest wrote into the top layer');
  await carryon(['checkin', 'office', '--json']);
  assert.equal(await serverFile('office', '/home/alice/notes.txt'), 'written-offline-on-the-laptop');
});

test('the same guest boots while the check-out is still under way (--limit-rate), reads never fail', async () => {
  // A slow background check-out; `run` takes the download over and the guest reads what it needs first.
  const slow: ChildProcess = spawn(process.execPath, [CLI, 'checkout', 'travel', '--limit-rate', '2M', '--quiet'], { env: cliEnv, stdio: 'ignore' });
  const slowEnded = new Promise<number | null>((r) => slow.once('exit', (code) => r(code)));
  try {
    let state: string | undefined;
    for (let i = 0; i < 200 && state !== 'transferring'; i++) {
      const st = await carryon(['status', 'travel', '--json']).catch(() => null);
      state = st ? (JSON.parse(st.stdout) as { state: string }[])[0]?.state : undefined;
      assert.notEqual(state, 'checked_out', 'the check-out is still in flight when the guest starts');
      await new Promise((r) => setTimeout(r, 100));
    }
    // `run` names its own rate: else it would keep the check-out's 2M (remembered for the download it takes over).
    const { report, stderr } = await runGuest('travel', [{ sha256: '/data/big.bin' }, { write: '/home/alice/trip.txt', content: 'booted-while-in-flight' }], ['--limit-rate', '1G']);
    assert.equal(report.sha256.get('/data/big.bin'), createHash('sha256').update(bigFile).digest('hex'), `the guest read the whole 8 MiB file while it was still arriving\n${stderr}`);
    assert.doesNotMatch(stderr, /I\/O error|EIO/);
  } finally {
    if (slow.exitCode === null) slow.kill('SIGINT');
    await slowEnded;
  }
  // Whatever `run` did not finish, `checkout` does; then the check-in carries the guest's file.
  await carryon(['--limit-rate', '1G', 'checkout', 'travel', '--quiet']);
  const st = JSON.parse((await carryon(['status', 'travel', '--json'])).stdout) as { safeOffline: boolean; readFailures: number }[];
  assert.deepEqual([st[0]!.safeOffline, st[0]!.readFailures], [true, 0]);
  await carryon(['checkin', 'travel', '--json']);
  assert.equal(await serverFile('travel', '/home/alice/trip.txt'), 'booted-while-in-flight');
  assert.equal(await serverFile('travel', '/etc/motd'), 'welcome to travel\n');
});
