// carryon-test: serial
// carryon-test: sqlite-only (the guest and the laptop are the subject; the broker only hands out the check-out)
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { mkdirSync } from 'node:fs';
import { connect } from 'node:net';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { after, before, test } from 'node:test';
import type { RunningBroker } from '../../src/broker/start.js';
import { ADMIN, api, cleanup, testBroker, type Api } from '../broker/harness.js';
import { socketDir } from '../../src/live/disks/disks.js';
import { Vault } from '../../src/client/vault/vault.js';
import { writePolicy } from '../../src/client/vault/guards.js';
import { backgroundRun } from '../support/guest-run.js';
import { cupsSkip, ippAnswer, ippHttpRequest, ippPrintJob, startCups, type PrivateCups } from '../support/cups.js';
import {
  buildDesktopInitramfs,
  GUEST_AGENT_STARTED,
  GUEST_SHUTDOWN_ASKED,
  guestAppend,
  guestKernel,
  guestQemuArgs,
  guestShell,
  LIST_CONNECTORS,
  makeExt4Image,
  parseConnectors,
  parseGuestSerial,
  type GuestConnector,
} from '../support/guest.js';

// A desktop as a user works in it, seen from inside a real Linux guest (Debian kernel, busybox
// initramfs with qemu-guest-agent) under `carryon run` (TCG): two monitors on virtio-gpu, the
// window's size reaching the guest (VNC's SetDesktopSize), a print job reaching the laptop's CUPS
// (a private cupsd) while the policy allows it and not after, suspend/resume with the guest's
// clock set again, and an orderly power-off at SIGTERM. One boot for all of it: the guest idles and the test acts in it through its
// agent (guest-exec).
const run = promisify(execFile);
const CLI = join(process.cwd(), 'dist', 'src', 'cli', 'main.js');
const DESKTOP = 'desk';
const QUEUE = 'carryon';
let broker: RunningBroker & { dir: string };
let http: Api;
let cups: PrivateCups;
let initrd: string;
let cliEnv: NodeJS.ProcessEnv;
const page = Buffer.from('%!PS\n% printed in the guest\nshowpage\n');

const carryon = (args: string[]) => run(process.execPath, [CLI, ...args], { env: cliEnv, maxBuffer: 16 << 20, timeout: 120_000 });

/** Polls `read()` until `ok` holds, every 250 ms, for at most `ms`; says what it waited for and what it saw last. */
async function until<T>(what: string, ms: number, read: () => T | Promise<T>, ok: (v: T) => boolean): Promise<T> {
  const end = Date.now() + ms;
  for (;;) {
    const v = await read();
    if (ok(v)) return v;
    if (Date.now() > end) throw new Error(`waited ${ms} ms for ${what}; last: ${JSON.stringify(v).slice(0, 2000)}`);
    await new Promise((r) => setTimeout(r, 250));
  }
}

/**
 * A VNC client's "resize the remote desktop to my window" (RFB SetDesktopSize, with the
 * ExtendedDesktopSize encoding): None security on the private unix socket, then the request.
 * Answers the server's status for it (0 done, 3 refused as an invalid layout, 4 forwarded to the
 * guest) and the framebuffer size the server announced at connect.
 */
async function vncSetDesktopSize(socket: string, width: number, height: number): Promise<{ status: number; initial: [number, number] }> {
  const sock = connect(socket);
  let buf = Buffer.alloc(0);
  let wake: (() => void) | null = null;
  let closed: Error | null = null;
  sock.on('data', (d: Buffer) => {
    buf = Buffer.concat([buf, d]);
    wake?.();
  });
  sock.on('error', (e) => (closed = e));
  sock.on('close', () => {
    closed ??= new Error('the VNC server closed the connection');
    wake?.();
  });
  const read = async (n: number): Promise<Buffer> => {
    const end = Date.now() + 20_000;
    while (buf.length < n) {
      if (closed) throw closed;
      if (Date.now() > end) throw new Error(`VNC: waited for ${n} bytes, have ${buf.length}`);
      await new Promise<void>((r) => {
        wake = r;
        setTimeout(r, 200);
      });
    }
    const out = buf.subarray(0, n);
    buf = buf.subarray(n);
    return out;
  };
  try {
    assert.match((await read(12)).toString('latin1'), /^RFB 003\.00\d\n$/);
    sock.write('RFB 003.008\n');
    const types = [...(await read((await read(1))[0]!))];
    assert.ok(types.includes(1), `the private socket offers no-auth (types ${types.join(',')})`);
    sock.write(Buffer.from([1]));
    assert.equal((await read(4)).readUInt32BE(0), 0, 'security handshake');
    sock.write(Buffer.from([1])); // ClientInit: shared
    const init = await read(24);
    await read(init.readUInt32BE(20)); // desktop name
    const initial: [number, number] = [init.readUInt16BE(0), init.readUInt16BE(2)];
    // SetEncodings: ExtendedDesktopSize (-308) and DesktopSize (-223) only: no pixels will come.
    const enc = Buffer.alloc(12);
    enc.writeUInt8(2, 0);
    enc.writeUInt16BE(2, 2);
    enc.writeInt32BE(-308, 4);
    enc.writeInt32BE(-223, 8);
    // SetDesktopSize: width, height, one screen (id 0 at 0,0) of that size.
    const req = Buffer.alloc(24);
    req.writeUInt8(251, 0);
    req.writeUInt16BE(width, 2);
    req.writeUInt16BE(height, 4);
    req.writeUInt8(1, 6);
    req.writeUInt16BE(width, 16);
    req.writeUInt16BE(height, 18);
    sock.write(Buffer.concat([enc, req]));
    // FramebufferUpdates until the ExtendedDesktopSize rectangle that answers this client (x = 1).
    for (;;) {
      const type = (await read(1))[0];
      assert.equal(type, 0, `only framebuffer updates are expected, got message ${type}`);
      const rects = (await read(3)).readUInt16BE(1);
      for (let i = 0; i < rects; i++) {
        const r = await read(12);
        const encoding = r.readInt32BE(8);
        if (encoding === -308) {
          const screens = (await read(4))[0]!;
          await read(16 * screens);
          if (r.readUInt16BE(0) === 1) return { status: r.readUInt16BE(2), initial };
        } else assert.equal(encoding, -223, `unexpected rectangle encoding ${encoding}`);
      }
    }
  } finally {
    sock.destroy();
  }
}

before(async () => {
  broker = await testBroker();
  http = api(broker.url, broker.fingerprint);
  const admin = await http.login(ADMIN.name, ADMIN.password);
  await http.call('POST', '/v1/admin/users', { name: 'alice', password: 'alice-password' }, admin);
  const image = join(broker.dir, `${DESKTOP}.raw`);
  await makeExt4Image(image, 16, { 'etc/motd': 'a desktop to work in\n' });
  const r = await http.call('POST', '/v1/admin/desktops', { name: DESKTOP, image, config: { vcpus: 1, ramMiB: 256, minRamMiB: 128 } }, admin);
  assert.equal(r.status, 201, JSON.stringify(r.body));
  await http.call('POST', '/v1/admin/entitlements', { principalType: 'user', principal: 'alice', targetType: 'desktop', target: DESKTOP }, admin);
  assert.equal((await http.call('PUT', `/v1/admin/policies/desktop/${DESKTOP}`, { printingAllowed: true }, admin)).status, 200);
  if (!cupsSkip) cups = await startCups(join(broker.dir, 'cups'), QUEUE);
  // The guest's Print-Job is made here, to the printer address `run` gives it (see PRINT).
  mkdirSync(join(broker.dir, 'guest'));
  // No ACPI button watch: a guest that ignores it (its agent is what `run` then relies on).
  initrd = await buildDesktopInitramfs(join(broker.dir, 'guest'), {
    'etc/carryon/job.http': ippHttpRequest('10.0.2.100:631', `/printers/${QUEUE}`, ippPrintJob(`ipp://10.0.2.100:631/printers/${QUEUE}`, page, { user: 'guest-alice', jobName: 'from-the-guest' })),
  }, { powerButton: false });
  const home = join(broker.dir, 'home');
  // The laptop's CUPS is the private one (the relay follows CUPS_SERVER, as CUPS's own clients do).
  cliEnv = { ...process.env, CARRYON_HOME: home, CARRYON_USER: 'alice', CARRYON_PASSWORD: 'alice-password', CARRYON_SCRYPT_N: '1024', ...(cups ? { CUPS_SERVER: cups.socket } : {}) };
  await carryon(['enroll', broker.url, '--fingerprint', broker.fingerprint, '--name', 'laptop']);
  await carryon(['checkout', DESKTOP, '--quiet']);
});
after(async () => {
  await cups?.stop();
  await http?.close();
  await broker?.close();
  if (broker) cleanup(broker.dir);
});

/**
 * The guest prints: the whole HTTP request (made here) to its printer with busybox nc, the answer
 * in base64. (busybox wget's --post-file stops at the first NUL byte: IPP is binary.) nc ends when
 * the far end closes (CUPS after its answer; the relay at once where printing is not allowed);
 * its input stays open until then, as busybox nc quits at the end of its input.
 */
const PRINT = `rm -f /tmp/answer
(cat /etc/carryon/job.http; sleep 60) 2>/dev/null | nc 10.0.2.100 631 > /tmp/answer 2>/dev/null &
nc_pid=$!
i=0; while kill -0 $nc_pid 2>/dev/null && [ $i -lt 300 ]; do usleep 100000; i=$((i + 1)); done
base64 /tmp/answer`;

test('in the guest: two monitors on virtio-gpu; the VNC window\'s size becomes its preferred mode; a job printed in it arrives in the laptop\'s CUPS, and none once printing is taken away; suspend (paused) and resume set its clock; SIGTERM to run shuts down a guest deaf to ACPI through its agent', { skip: cupsSkip, timeout: 600_000 }, async (t) => {
  const t0 = Date.now();
  const phases: string[] = [];
  const phase = (name: string) => phases.push(`${name} ${((Date.now() - t0) / 1000).toFixed(1)}s`);
  const vault = await Vault.open(cliEnv.CARRYON_HOME!);
  const desktopId = (await vault.find(DESKTOP)).desktopId;
  const vmDir = join(await socketDir(vault, desktopId), 'vm');
  const qga = join(vmDir, 'qga.sock');
  const serialPath = join(broker.dir, 'desk.serial');
  const args = ['run', DESKTOP, '--accel', 'tcg', '--display', 'vnc', '--monitors', '2', '--serial', serialPath];
  args.push(...guestQemuArgs({ kernel: guestKernel(), initrd, append: guestAppend([{ idle: true }], { waitS: 60 }) }).map((a) => `--qemu-arg=${a}`));
  // A bounded wait for the guest's power-off, so that a guest that does not go fails in time.
  const vm = backgroundRun(CLI, args, { ...cliEnv, CARRYON_TEST_POWEROFF_GRACE_MS: '45000' }, serialPath);
  const { child, serial } = vm;
  const sh = (script: string) => guestShell(qga, script, 60_000);
  try {
    await until('the guest to boot and idle with its agent', 180_000, serial, (s) => (s.includes(GUEST_AGENT_STARTED) && s.includes('CARRYON-IDLE')) || s.includes('CARRYON-GUEST-FAIL') || child.exitCode !== null);
    assert.ok(serial().includes('CARRYON-IDLE'), `the guest is up\n${vm.stderr()}\n${serial().slice(-3000)}`);
    assert.match(vm.stderr(), /printing: the desktop's printer is ipp:\/\/10\.0\.2\.100:631\//);
    phase('booted');

    // --monitors 2: virtio-gpu with two outputs, two DRM connectors in the guest. VNC shows the
    // first (one VNC server shows one head); the second is there for a window that shows it.
    const connectors = parseConnectors(await sh(LIST_CONNECTORS));
    assert.deepEqual(connectors.map((c) => c.name), ['card0-Virtual-1', 'card0-Virtual-2'], JSON.stringify(connectors));
    assert.equal(connectors[0]!.status, 'connected');
    assert.equal(connectors[0]!.modes[0], '1280x800', 'virtio-gpu\'s default size before any window asked');

    // The window's size: a VNC client asks for 1152x720 and QEMU forwards it to virtio-gpu, whose
    // guest driver makes it the connector's preferred mode (a desktop session then switches to it).
    const vnc = await vncSetDesktopSize(join(vmDir, 'vnc.sock'), 1152, 720);
    assert.deepEqual(vnc, { status: 4, initial: [1280, 800] }, 'QEMU forwarded the size to the guest');
    const resized = await until('the guest\'s preferred mode to follow the window', 30_000, async () => parseConnectors(await sh(LIST_CONNECTORS)), (c: GuestConnector[]) => c[0]?.modes[0] === '1152x720');
    assert.equal(resized[0]!.status, 'connected');
    phase('monitors and window size');

    // Printing allowed: the guest's Print-Job reaches the private cupsd through the relay (IPP successful-ok).
    await sh('ifconfig eth0 10.0.2.15 netmask 255.255.255.0 up');
    assert.deepEqual(ippAnswer(Buffer.from(await sh(PRINT), 'base64')), { http: 200, ipp: 0 }, 'CUPS took the job (IPP successful-ok)');
    const jobs = await until('the job in CUPS', 10_000, () => cups.jobs(), (j) => j.length === 1);
    assert.deepEqual([jobs[0]!.user, jobs[0]!.document.toString()], ['guest-alice', page.toString()], 'the page arrived as the guest sent it');
    phase('printed');

    // Suspend and resume: `carryon power` pauses the guest (not S3: see src/live/power.ts) and
    // resumes it, and its agent sets its clock. The clock is set an hour wrong first, so only the
    // agent's guest-set-time can have mended it.
    await sh(`date -s @${Math.floor(Date.now() / 1000) - 3600} >/dev/null`);
    assert.match((await carryon(['power', DESKTOP, 'suspend'])).stdout, /desk: the guest is paused/);
    await new Promise((r) => setTimeout(r, 1_000));
    assert.match((await carryon(['power', DESKTOP, 'resume'])).stdout, /desk: the guest runs again; its clock was set by its agent/);
    const guestNow = Number((await sh('date +%s')).trim());
    assert.ok(Math.abs(guestNow - Date.now() / 1000) < 30, `the guest's clock is the laptop's again (guest ${guestNow}, host ${Math.floor(Date.now() / 1000)})`);
    phase('suspended and resumed');

    // Printing taken away while the desktop runs (the agent writes the broker's new policy): the
    // relay finds no path for the next job, and nothing more reaches CUPS.
    await writePolicy(vault.desktopDir(desktopId), { usbAllowed: false, printingAllowed: false });
    const denied = Buffer.from(await sh(PRINT), 'base64');
    assert.equal(denied.length, 0, `the guest's connection was closed without an answer: ${denied.toString('latin1').slice(0, 200)}`);
    await new Promise((r) => setTimeout(r, 1_000));
    assert.equal((await cups.jobs()).length, 1, 'no second job reached CUPS');
    phase('printing taken away');

    // SIGTERM to `run` (the host shuts down): this guest ignores the ACPI button (no acpid, as
    // here), so its agent's guest-shutdown, which `run` sends besides the button, powers it off in order.
    child.kill('SIGTERM');
    assert.equal(await vm.exit(90_000), 0, `run ends when the guest powers off\n${vm.stderr()}`);
    assert.match(vm.stderr(), /the guest powered off cleanly/);
    const report = parseGuestSerial(serial());
    assert.ok(report.done && serial().includes(GUEST_SHUTDOWN_ASKED) && !report.powerButton, `the guest stopped idling, unmounted its disk and powered off\n${serial().slice(-2000)}`);
    phase('powered off');
    // And the next start of the desktop gives the guest no printer at all (no guestfwd on QEMU's
    // line). Headless: the remembered --monitors 2 does not apply to --display none.
    const next = JSON.parse((await carryon(['--json', 'run', DESKTOP, '--accel', 'tcg', '--display', 'none', '--dry-run'])).stdout) as { argv: string[] };
    assert.doesNotMatch(next.argv.join(' '), /guestfwd|10\.0\.2\.100/, 'printing taken away: no path to the printer in the next run');
  } finally {
    if (child.exitCode === null && child.signalCode === null) {
      child.kill('SIGINT');
      child.kill('SIGINT');
      await vm.exited;
    }
    t.diagnostic(phases.join(', '));
  }
});
