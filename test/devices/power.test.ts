import assert from 'node:assert/strict';
import { mkdtempSync, rmSync } from 'node:fs';
import { createServer, type Server, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { followHostSleep, parsePrepareForSleep } from '../../src/devices/host-sleep.js';
import { sendPower } from '../../src/live/power.js';
import { RELAY_SCRIPT } from '../../src/devices/print-relay.js';
import { hostFacts } from '../../src/hypervisor/host.js';
import { runDesktop } from '../../src/hypervisor/launch-desktop.js';
import { parseOfflineConfig, type RunningDesktop } from '../../src/hypervisor/launch.js';
import { QGA_SENTINEL } from '../../src/live/guest-agent.js';
import { stopReasonWords } from '../../src/client/devices/stop-reason.js';

// Power events on a real QEMU started paused (no guest boots): QMP's view of the run state and its
// events are the evidence. A fake qemu-guest-agent stands in where the guest's agent answers.
const dir = mkdtempSync(join(tmpdir(), 'carryon-power-'));
let vm: RunningDesktop;
let ended: Promise<unknown>;
let agentServer: Server;
const agentSeen: { execute: string; arguments?: Record<string, unknown> }[] = [];
const peers: Socket[] = [];

before(async () => {
  vm = await new Promise<RunningDesktop>((resolve, reject) => {
    ended = runDesktop({
      name: 'power',
      disks: [{ name: 'disk0', blockdev: { driver: 'null-co', 'node-name': 'd0-top', size: 1 << 20 }, secretId: 'sec-d0', secret: 'c2VjcmV0' }],
      // With printing allowed: QEMU must take the relay's guestfwd as `run` builds it (it runs only when the guest connects).
      config: parseOfflineConfig({ vcpus: 1, ramMiB: 128, nic: 'user', printing: true }),
      printRelay: [process.execPath, RELAY_SCRIPT, join(dir, 'policy.json'), join(dir, 'cups.sock')],
      // The display line as `run --display vnc --monitors 2` builds it: QEMU must accept it.
      socketDir: join(dir, 'vm'), display: 'none', vnc: true, monitors: 2, paused: true, accel: 'tcg', host: { ...hostFacts(), kvm: false }, stdio: 'ignore',
      onStarted: resolve,
    }).catch(reject);
  });
  // An agent that syncs, sets the time, and takes a suspend in silence (as QGA does) without the guest ever suspending.
  agentServer = createServer((sock) => {
    peers.push(sock);
    let buf = '';
    sock.on('error', () => undefined);
    sock.on('data', (d: Buffer) => {
      buf += d.toString('latin1').replace(/\xff/g, '');
      let nl;
      while ((nl = buf.indexOf('\n')) >= 0) {
        const req = JSON.parse(buf.slice(0, nl)) as { execute: string; arguments?: Record<string, unknown> };
        buf = buf.slice(nl + 1);
        agentSeen.push(req);
        if (req.execute === 'guest-sync-delimited') sock.write(Buffer.concat([Buffer.from([QGA_SENTINEL]), Buffer.from(`${JSON.stringify({ return: req.arguments?.id })}\n`)]));
        else if (req.execute === 'guest-set-time') sock.write(`${JSON.stringify({ return: {} })}\n`);
      }
    });
  });
  await new Promise<void>((r) => agentServer.listen(join(dir, 'agent.sock'), r));
});

after(async () => {
  for (const p of peers) p.destroy();
  agentServer?.close();
  await vm?.qmp('quit').catch(() => undefined);
  await ended;
  rmSync(dir, { recursive: true, force: true });
});

const status = async () => ((await vm.qmp('query-status')) as { status: string; running: boolean });

test('no guest agent: suspend pauses the CPUs, resume runs them again and says the clock was not set; powerdown and reset reach QEMU as ACPI button and reset', async () => {
  const target = { qmp: vm.connection, guestAgentSocket: vm.guestAgentSocket };
  const opts = { agentTimeoutMs: 300 };
  assert.match(await sendPower(target, 'suspend', opts), /paused/);
  assert.equal((await status()).running, false);
  assert.match(await sendPower(target, 'resume', opts), /runs again; its clock was not set/);
  assert.equal((await status()).status, 'running');
  assert.match(await sendPower(target, 'resume', opts), /was running already/);
  assert.match(await sendPower(target, 'suspend', opts), /paused/);
  assert.equal((await status()).status, 'paused');
  assert.match(await sendPower(target, 'suspend', opts), /already paused/);
  assert.match(await sendPower(target, 'resume', opts), /runs again/);
  assert.match(await sendPower(target, 'powerdown', opts), /ACPI power button/);
  await vm.connection.waitEvent((e) => e.event === 'POWERDOWN', 5_000);
  assert.match(await sendPower(target, 'reset', opts), /reset/);
  await vm.connection.waitEvent((e) => e.event === 'RESET', 5_000);
});

test('with an agent: suspend pauses the guest (never S3: a q35 guest woken from S3 no longer hears its ACPI button); resume sets the guest clock through the agent', async () => {
  const target = { qmp: vm.connection, guestAgentSocket: join(dir, 'agent.sock') };
  assert.match(await sendPower(target, 'suspend', { agentTimeoutMs: 1_000 }), /paused/);
  assert.ok(!agentSeen.some((r) => r.execute === 'guest-suspend-ram'), 'the agent was not asked to suspend to RAM');
  assert.equal((await status()).status, 'paused');
  const before = Date.now();
  assert.match(await sendPower(target, 'resume', { agentTimeoutMs: 1_000 }), /runs again; its clock was set by its agent/);
  const set = agentSeen.find((r) => r.execute === 'guest-set-time');
  const ns = Number(set?.arguments?.time);
  assert.ok(ns / 1e6 >= before - 1 && ns / 1e6 <= Date.now() + 1, `the guest is given the host's time in ns: ${ns}`);
  assert.equal((await status()).status, 'running');
});

test('--display vnc --monitors 2: QEMU runs a virtio VGA with two outputs and VNC on the private unix socket only', async () => {
  assert.equal(await vm.qmp('qom-get', { path: '/machine/peripheral/video0', property: 'max_outputs' }), 2);
  const vnc = (await vm.qmp('query-vnc')) as { enabled: boolean; family?: string; host?: string };
  assert.equal(vnc.enabled, true);
  assert.equal(vnc.family, 'unix');
});

test('host sleep: PrepareForSleep(true) suspends the guest, then lets go of the delay lock; (false) takes the lock again and resumes it', async () => {
  const seen: string[] = [];
  let held = 0;
  const lines = ['/org/freedesktop/login1: org.freedesktop.login1.Manager.SessionNew (...)', '/org/freedesktop/login1: org.freedesktop.login1.Manager.PrepareForSleep (true,)', '/org/freedesktop/login1: org.freedesktop.login1.Manager.PrepareForSleep (false,)'];
  await followHostSleep({
    lines: (async function* () { yield* lines; })(),
    inhibit: () => {
      held++;
      seen.push(`lock (${held})`);
      return { release: () => void seen.push(`release (${--held})`) };
    },
    close: () => undefined,
  }, { beforeSleep: async () => void seen.push('suspend guest'), afterWake: async () => void seen.push('resume guest') }, () => undefined);
  assert.deepEqual(seen, ['lock (1)', 'suspend guest', 'release (0)', 'lock (1)', 'resume guest', 'release (0)']);
  assert.equal(parsePrepareForSleep('x.PrepareForSleep (true,)'), true);
  assert.equal(parsePrepareForSleep('x.PrepareForShutdown (true,)'), null);
});

test('why a run stops, in words: the agent\'s lease expiry, lock and wipe, or the user', () => {
  assert.match(stopReasonWords('lease-expired'), /lease ran out/);
  assert.match(stopReasonWords('locked'), /administrator locked/);
  assert.match(stopReasonWords('wiped'), /wiped/);
  assert.match(stopReasonWords(null), /Ctrl-C or SIGTERM/);
});
