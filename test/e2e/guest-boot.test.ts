// carryon-test: sqlite-only (the guest and the laptop are the subject; their broker side runs on PostgreSQL in lifecycle and live)
import assert from 'node:assert/strict';
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { after, before, test } from 'node:test';
import type { RunningBroker } from '../../src/broker/start.js';
import { exportCurrentSnapshot, exportSnapshot } from '../../src/broker/desktops/snapshot-image.js';
import { ADMIN, api, cleanup, testBroker, type Api } from '../broker/harness.js';
import { GuestAgent } from '../../src/live/guest-agent.js';
import { socketDir } from '../../src/live/disks/disks.js';
import { Vault } from '../../src/client/vault/vault.js';
import { backgroundRun } from '../support/guest-run.js';
import { quiesce } from '../../src/live/quiesce.js';
import {
  buildInitramfs,
  checkExt4Image,
  writerRecordsInImage,
  GUEST_AGENT_STARTED,
  GUEST_SHUTDOWN_ASKED,
  guestAppend,
  guestKernel,
  guestQemuArgs,
  lastDurableRecord,
  makeExt4Image,
  parseGuestSerial,
  readExt4File,
  verifyWriterRecords,
  type GuestAction,
  type GuestReport,
} from '../support/guest.js';

// A real Linux guest (Debian kernel, busybox initramfs with qemu-guest-agent) boots from a
// checked-out desktop with `carryon run` (TCG), writes a file, and the check-in carries it to the
// broker's new snapshot. The first boot also drives the guest agent on `carryon run`'s channel.
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

/** `carryon run` with the test kernel, in the background: the guest does `actions` (a writer last runs until it is stopped). */
function startGuest(desktop: string, actions: GuestAction[], extra: string[] = []) {
  const serialPath = join(broker.dir, `${desktop}-${Date.now()}.serial`);
  const args = [...extra, 'run', desktop, '--accel', 'tcg', '--display', 'none', '--serial', serialPath];
  args.push(...guestQemuArgs({ kernel, initrd, append: guestAppend(actions, { waitS: 60 }) }).map((a) => `--qemu-arg=${a}`));
  const run = backgroundRun(CLI, args, cliEnv, serialPath);
  const { child, exited, serial, stderr } = run;
  return {
    args,
    child,
    serial,
    stderr,
    exit: run.exit,
    /** Ends a run a failed test left behind: two Ctrl-Cs kill QEMU. */
    async cleanup() {
      if (child.exitCode !== null || child.signalCode !== null) return;
      child.kill('SIGINT');
      child.kill('SIGINT');
      await exited;
    },
    report(): GuestReport {
      const report = parseGuestSerial(serial());
      assert.ok(report.done, `the guest finished: ${report.failure ?? ''}\n${stderr()}\n${serial().slice(-3000)}`);
      return report;
    },
  };
}

/** Where `carryon run` puts a desktop's guest agent channel (launch-desktop.ts: `<socketDir>/vm/qga.sock`). */
async function qgaSocketOf(desktop: string): Promise<string> {
  const vault = await Vault.open(cliEnv.CARRYON_HOME!);
  return join(await socketDir(vault, (await vault.find(desktop)).desktopId), 'vm', 'qga.sock');
}

/** Polls `read()` until `ok` holds, every 100 ms, for at most `ms`; says what it waited for. */
async function until<T>(what: string, ms: number, read: () => T, ok: (v: T) => boolean): Promise<T> {
  const end = Date.now() + ms;
  for (;;) {
    const v = read();
    if (ok(v)) return v;
    if (Date.now() > end) throw new Error(`waited ${ms} ms for ${what}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

/** The writer's records in the desktop's current snapshot on the broker. */
async function serverRecords(desktop: string, path: string) {
  const out = join(broker.dir, `${desktop}-snapshot.raw`);
  await exportCurrentSnapshot(broker.ctx, desktop, out);
  return verifyWriterRecords(await readExt4File(out, path));
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
  initrd = await buildInitramfs(join(broker.dir, 'guest'), { guestAgent: true, powerButton: true });
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

test('a real Linux guest under carryon run: its agent freezes and thaws; three live replicas while it writes are quiesced, fsck-clean and hold every logged record; a check-in of the running guest shuts it down (ACPI) and carries it all', async (t) => {
  const t0 = Date.now();
  const phases: string[] = [];
  const phase = (name: string) => phases.push(`${name} ${((Date.now() - t0) / 1000).toFixed(1)}s`);
  await carryon(['checkout', 'office', '--quiet']);
  phase('checked out');
  const actions: GuestAction[] = [{ read: '/etc/motd' }, { write: '/home/alice/notes.txt', content: 'written-offline-on-the-laptop' }, { writer: '/home/alice/records.log', perSync: 4 }];
  // `carryon run` gives every guest the agent's channel; its dry run says where.
  const dry = JSON.parse((await carryon(['--json', 'run', 'office', '--accel', 'tcg', '--display', 'none', '--dry-run'])).stdout) as { argv: string[] };
  const vm = startGuest('office', actions);
  const qgaSocket = /^socket,id=qga0,path=([^,]+),server=on,wait=off$/.exec(dry.argv[dry.argv.indexOf('-chardev') + 1] ?? '')?.[1];
  const serial = vm.serial;
  let agent: GuestAgent | undefined;
  try {
    assert.ok(qgaSocket, `the run's command line has the agent's channel: ${dry.argv.join(' ')}`);
    await until('the agent to start and the writer to make records durable', 120_000, serial, (t) => (t.includes(GUEST_AGENT_STARTED) && lastDurableRecord(t) >= 4) || /CARRYON-GUEST-FAIL/.test(t) || vm.child.exitCode !== null);
    assert.ok(lastDurableRecord(serial()) >= 4, `the guest runs its writer\n${vm.stderr()}\n${serial().slice(-3000)}`);
    phase('agent and writer up');
    agent = await GuestAgent.connect(qgaSocket, 20_000);
    await agent.ping(10_000);

    // Frozen: the writer's next fdatasync cannot finish, so no record becomes durable (one group may have been under way).
    assert.ok((await agent.freeze(10_000)) >= 1, 'the ext4 mount froze');
    const atFreeze = lastDurableRecord(serial());
    assert.equal(await agent.status(10_000), 'frozen');
    await new Promise((r) => setTimeout(r, 1_000));
    const whileFrozen = lastDurableRecord(serial());
    assert.ok(whileFrozen <= atFreeze + 4, `no write completes while frozen: ${atFreeze} → ${whileFrozen}`);
    assert.ok((await agent.thaw(10_000)) >= 1);
    assert.equal(await agent.status(10_000), 'thawed');
    await until('the writer to go on after the thaw', 30_000, () => lastDurableRecord(serial()), (n) => n > whileFrozen + 4);

    // A second client waits while the first holds the channel; after it lets go, a new connection syncs past whatever was left.
    await assert.rejects(GuestAgent.connect(qgaSocket, 1_000), /another client holds/);
    agent.close();
    agent = await GuestAgent.connect(qgaSocket, 20_000);

    // quiesce() around a point in time, as a replica does: the guest is frozen while it runs.
    const q = await quiesce(agent, async () => agent!.status(10_000), { pingTimeoutMs: 10_000 });
    assert.deepEqual([q.result, q.kind, q.thawed], ['frozen', 'quiesced', true]);

    phase('frozen, thawed, quiesced');
    // The holder (`carryon run`) talks to the agent itself now: this test lets go of the channel.
    agent.close();
    agent = undefined;

    // Three live replicas while the writer writes: each restore point passes e2fsck -fn as it is
    // (quiesced: the frozen ext4 needs no journal replay) and holds every record logged before it.
    for (let i = 1; i <= 3; i++) {
      const logged = lastDurableRecord(serial());
      // A failure says what the holder (`carryon run`) logged: seen once in CI as "the process holding the desktop went away".
      const replica = JSON.parse((await carryon(['replicate', 'office', '--json']).catch((err: Error) => {
        throw new Error(`replica ${i}: ${err.message}\ncarryon run (exit ${vm.child.exitCode}) said:\n${vm.stderr().slice(-3000)}\nthe guest's console (its last lines):\n${serial().slice(-2000)}`);
      })).stdout) as { snapshotId: string; replicaKind: string };
      assert.equal(replica.replicaKind, 'quiesced', `replica ${i} froze the guest's file systems`);
      const raw = join(broker.dir, `office-replica-${i}.raw`);
      await exportSnapshot(broker.ctx, 'office', replica.snapshotId, raw);
      const fsck = await checkExt4Image(raw);
      assert.deepEqual([fsck.clean, fsck.journalReplayed], [true, false], `replica ${i}: e2fsck -fn\n${fsck.output}`);
      const records = await writerRecordsInImage(raw, '/home/alice/records.log');
      assert.ok(records.count >= logged && records.tornBytes === 0, `replica ${i} holds the ${logged} records logged before it (${records.count}, torn ${records.tornBytes})`);
      await until('the writer to go on after the replica', 30_000, () => lastDurableRecord(serial()), (n) => n > logged + 4);
    }
    phase('three live replicas');

    // Check-in of the running desktop: the bulk goes live, then the holder presses the guest's power button (ACPI).
    const checkin = JSON.parse((await carryon(['checkin', 'office', '--json'])).stdout) as { offToCommitSeconds: number };
    assert.ok(checkin.offToCommitSeconds >= 0);
    assert.equal(await vm.exit(60_000), 0, `carryon run ends when the guest powers off\n${vm.stderr()}`);
    phase(`checked in while running (${checkin.offToCommitSeconds.toFixed(2)} s from power-off to commit)`);
  } finally {
    agent?.close();
    await vm.cleanup();
  }
  const report = vm.report();
  assert.ok(report.agentStarted && report.powerButton, 'the check-in shut the guest down through its power button');
  assert.equal(report.reads.get('/etc/motd')?.toString('utf8'), 'welcome to office\n', 'the guest reads the checkpoint');
  assert.equal(await serverFile('office', '/home/alice/notes.txt'), 'written-offline-on-the-laptop');
  // Every record the guest logged is in the snapshot, a clean prefix ending where the writer stopped.
  assert.deepEqual(await serverRecords('office', '/home/alice/records.log'), { count: report.writerStopped, tornBytes: 0 });
  assert.ok(report.durableRecords === report.writerStopped);
  const fsck = await checkExt4Image(join(broker.dir, 'office-snapshot.raw'));
  assert.ok(fsck.clean, `the checked-in snapshot passes e2fsck -fn\n${fsck.output}`);
  phase(`checked in (${report.writerStopped} records)`);
  t.diagnostic(phases.join(', '));
});

test('the same guest boots while the check-out is still under way (--limit-rate), reads never fail; the guest agent shuts it down', async () => {
  let travelRecords: number | undefined;
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
    // The writer runs last, until Ctrl-C: `carryon run` then presses the ACPI power button and the guest shuts down cleanly.
    const vm = startGuest('travel', [{ sha256: '/data/big.bin' }, { write: '/home/alice/trip.txt', content: 'booted-while-in-flight' }, { writer: '/home/alice/trip.log' }], ['--limit-rate', '1G']);
    try {
      await until('the writer to make records durable', 120_000, vm.serial, (t) => (t.includes(GUEST_AGENT_STARTED) && lastDurableRecord(t) >= 4) || /CARRYON-GUEST-FAIL/.test(t) || vm.child.exitCode !== null);
      // guest-shutdown (no answer when it works): the writer stops, the disk is unmounted, QEMU exits.
      const agent = await GuestAgent.connect(await qgaSocketOf('travel'), 20_000);
      try {
        await agent.shutdown('powerdown', 10_000);
      } finally {
        agent.close();
      }
      assert.equal(await vm.exit(60_000), 0, `the agent's shutdown: the guest stops its work and powers off\n${vm.stderr()}`);
    } finally {
      await vm.cleanup();
    }
    const report = vm.report();
    assert.ok(vm.serial().includes(GUEST_SHUTDOWN_ASKED), 'the guest agent shut the guest down');
    travelRecords = report.writerStopped;
    assert.equal(report.sha256.get('/data/big.bin'), createHash('sha256').update(bigFile).digest('hex'), `the guest read the whole 8 MiB file while it was still arriving\n${vm.stderr()}`);
    assert.doesNotMatch(vm.stderr(), /I\/O error|EIO/);
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
  assert.deepEqual(await serverRecords('travel', '/home/alice/trip.log'), { count: travelRecords, tornBytes: 0 });
});
