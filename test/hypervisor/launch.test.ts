import assert from 'node:assert/strict';
import { mkdirSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, test } from 'node:test';
import { randomBytes } from 'node:crypto';
import { chainBlockdev, chainFiles, createChain } from '../../src/disk/chain.js';
import { ValidationError } from '../../src/core/errors.js';
import { freeDiskBytes, hostFacts, probeVirgl } from '../../src/hypervisor/host.js';
import { runDesktop } from '../../src/hypervisor/launch-desktop.js';
import { GuestAgent, GuestAgentUnavailable } from '../../src/live/guest-agent.js';
import { buildQemuCommand, encryptSecret, formatCommand, parseDisplay, parseMonitors, parseOfflineConfig, type LaunchDisk } from '../../src/hypervisor/launch.js';

const dir = mkdtempSync(join(tmpdir(), 'carryon-launch-'));
after(() => rmSync(dir, { recursive: true, force: true }));
const kvmHost = { cpus: 8, ramBytes: 16 * 2 ** 30, kvm: true };
const tcgHost = { cpus: 2, ramBytes: 4 * 2 ** 30, kvm: false };
const block = (name: string, i: number) => ({ driver: 'qcow2', 'node-name': `d${i}-top`, file: { driver: 'file', filename: `/v/${name}/top.qcow2` } });
const master = Buffer.alloc(32, 9);
const disks: LaunchDisk[] = ['disk0', 'data'].map((name, i) => ({ name, blockdev: block(name, i), secret: encryptSecret(`sec-d${i}`, 'c2VjcmV0LXBhc3NwaHJhc2U=', master) }));
const opts = { name: 'win11', qmpSocket: '/run/c/qmp.sock', guestAgentSocket: '/run/c/qga.sock' };

test('KVM host: kvm accel, host CPU, chain blockdevs with encrypted secrets, user NIC, QMP, no USB unless allowed', () => {
  const argv = buildQemuCommand(parseOfflineConfig({ vcpus: 4, ramMiB: 4096, usb: false, nic: 'user' }), kvmHost, disks, opts);
  const s = argv.join(' ');
  assert.equal(argv[0], 'qemu-system-x86_64');
  assert.match(s, /-accel kvm -cpu host -smp 4 -m 4096M/);
  assert.match(s, /-object secret,id=carryon-master,file=@SECRET@,format=base64/);
  assert.match(s, /-object secret,id=sec-d0,data=[A-Za-z0-9+\/=]+,keyid=carryon-master,iv=[A-Za-z0-9+\/=]+,format=base64/);
  assert.ok(!s.includes('c2VjcmV0LXBhc3NwaHJhc2U='), 'the disk passphrase never appears in argv');
  assert.ok(argv.includes(JSON.stringify(block('disk0', 0))));
  assert.match(s, /-device virtio-blk-pci,drive=d0-top,bootindex=1 .*-device virtio-blk-pci,drive=d1-top /);
  assert.match(s, /-nic user,model=virtio-net-pci/);
  assert.match(s, /-qmp unix:\/run\/c\/qmp.sock,server=on,wait=off/);
  // the guest agent's channel, always there
  assert.match(s, /-chardev socket,id=qga0,path=\/run\/c\/qga.sock,server=on,wait=off -device virtio-serial-pci,id=vser0 -device virtserialport,bus=vser0.0,chardev=qga0,name=org.qemu.guest_agent.0/);
  assert.doesNotMatch(s, /hostfwd|usb-host|qemu-xhci|-S\b/);
});

test('TCG host: clamps vCPUs and RAM to the host; USB devices only when policy allows; no NIC', () => {
  const usb = [{ vendorId: '046d', productId: 'c52b' }];
  const argv = buildQemuCommand(parseOfflineConfig({ vcpus: 8, ramMiB: 16384, usb: true, nic: 'none', usbDevices: usb, display: 'sdl' }), tcgHost, disks, { ...opts, paused: true });
  const s = argv.join(' ');
  assert.match(s, /-accel tcg -cpu max -smp 2 -m 3072M/);
  assert.match(s, /-nic none/);
  assert.match(s, /-display sdl/);
  // The controller only: the listed devices are hot-plugged by policy once QEMU runs (devices/usb-hotplug.ts).
  assert.match(s, /-device qemu-xhci,id=xhci/);
  assert.doesNotMatch(s, /usb-host/);
  assert.equal(argv.at(-1), '-S');
  const denied = buildQemuCommand(parseOfflineConfig({ vcpus: 1, ramMiB: 512, usb: false, usbDevices: usb }), tcgHost, disks, opts).join(' ');
  // No USB anywhere in the line but in the random secrets (base64: "usb" turns up in one run of ≈ 2000).
  assert.doesNotMatch(denied.replace(/(data|iv)=[A-Za-z0-9+/=]+/g, ''), /usb/);
  assert.throws(() => buildQemuCommand(parseOfflineConfig({ vcpus: 1, ramMiB: 512, usb: false }), tcgHost, disks, { ...opts, extraArgs: ['-device', 'usb-host,hostbus=1,hostaddr=2'] }), { code: 'policy' });
  // Allowed USB is still decided device by device: --qemu-arg cannot add one past the rules.
  assert.throws(() => buildQemuCommand(parseOfflineConfig({ vcpus: 1, ramMiB: 512, usb: true }), tcgHost, disks, { ...opts, extraArgs: ['-device', 'usb-storage,drive=x'] }), { code: 'policy', message: /carryon usb attach/ });
});

test('bad config and unsafe names are refused', () => {
  assert.throws(() => parseOfflineConfig({ vcpus: 0, ramMiB: 512 }), ValidationError);
  assert.throws(() => parseOfflineConfig({ vcpus: 1, ramMiB: 512, display: 'gtk -device evil' }), ValidationError);
  const c = parseOfflineConfig({ vcpus: 1, ramMiB: 512 });
  assert.throws(() => buildQemuCommand(c, tcgHost, [{ ...disks[0]!, name: 'a,b' }], opts), ValidationError);
  assert.throws(() => buildQemuCommand(c, tcgHost, disks, { ...opts, qmpSocket: '/s,x' }), ValidationError);
  assert.throws(() => buildQemuCommand(c, tcgHost, disks, { ...opts, guestAgentSocket: '/s,server=off' }), ValidationError);
  assert.throws(() => buildQemuCommand(c, tcgHost, disks, { ...opts, guestAgentSocket: '/s x' }), ValidationError);
  assert.throws(() => buildQemuCommand(c, tcgHost, [], opts), ValidationError);
  assert.equal(formatCommand(['a b', "it's", 'x=1,y']), `'a b' 'it'\\''s' x=1,y`);
});

test('a desktop host\'s display: headless, a VGA device and VNC on a unix socket only (no TCP port); a comma in its path is refused', () => {
  const c = parseOfflineConfig({ vcpus: 1, ramMiB: 512, nic: 'none' });
  const s = buildQemuCommand(c, tcgHost, disks, { ...opts, display: 'none', vncSocket: '/run/h/vnc.sock' }).join(' ');
  assert.match(s, /-display none -vga virtio -vnc unix:\/run\/h\/vnc.sock/);
  assert.doesNotMatch(buildQemuCommand(c, tcgHost, disks, { ...opts, display: 'none' }).join(' '), /-vnc|-vga/);
  assert.throws(() => buildQemuCommand(c, tcgHost, disks, { ...opts, vncSocket: '/run/h,x/vnc.sock' }), ValidationError);
});

test('display: gtk, sdl, spice-app, vnc (unix socket) or none; monitors as virtio-vga outputs; virgl only with a window; bad flags refused', () => {
  const c = parseOfflineConfig({ vcpus: 1, ramMiB: 512, nic: 'none' });
  const s = (o: Partial<Parameters<typeof buildQemuCommand>[3]>) => buildQemuCommand(c, tcgHost, disks, { ...opts, ...o }).join(' ');
  assert.match(s({ display: 'gtk' }), /-display gtk -vga virtio /);
  assert.match(s({ display: 'sdl', monitors: 2 }), /-display sdl -vga none -device virtio-vga,id=video0,max_outputs=2 /);
  assert.match(s({ display: 'spice-app', gl: true }), /-display spice-app,gl=on -vga none -device virtio-vga-gl,id=video0,max_outputs=1 /);
  assert.match(s({ display: 'gtk', gl: true, monitors: 3 }), /-display gtk,gl=on -vga none -device virtio-vga-gl,id=video0,max_outputs=3 /);
  assert.match(s({ display: 'vnc', vncSocket: '/run/c/vnc.sock', monitors: 2 }), /-display none -vga none -device virtio-vga,id=video0,max_outputs=2 -vnc unix:\/run\/c\/vnc.sock /);
  assert.doesNotMatch(s({ display: 'none' }), /-vga|virtio-vga|-vnc/);
  assert.match(s({ display: 'sdl,grab-mod=rctrl' }), /-display sdl,grab-mod=rctrl -vga virtio/);
  assert.throws(() => s({ display: 'vnc' }), ValidationError, 'vnc without its private socket');
  assert.throws(() => s({ display: 'none', monitors: 2 }), /needs a display/);
  assert.throws(() => s({ display: 'none', gl: true }), /needs a window/);
  assert.throws(() => s({ display: 'vnc', vncSocket: '/run/c/vnc.sock', gl: true }), /needs a window/);
  assert.throws(() => s({ display: 'curses' }), /display must be one of gtk, sdl, spice-app, vnc, none/);
  for (const bad of ['0', '9', '2x', '-1', '']) assert.throws(() => parseMonitors(bad), { code: 'invalid' }, bad);
  assert.equal(parseMonitors('4'), 4);
  assert.equal(parseDisplay('gtk,zoom-to-fit=on'), 'gtk');
});

test('the virgl probe runs QEMU and answers with a reason when GL does not work (never from a file existing)', async () => {
  const r = await probeVirgl(800);
  if (!r.ok) assert.ok(r.why && r.why.length > 0, 'a refusal says why');
});

test('host facts', async () => {
  const h = hostFacts();
  assert.ok(h.cpus >= 1 && h.ramBytes > 0);
  assert.ok((await freeDiskBytes(dir)) > 0);
});

test('dry run builds the argv without starting anything; extra args, serial and accel are shown', async () => {
  const r = await runDesktop({ name: 'dry', disks: [{ name: 'disk0', blockdev: block('disk0', 0), secretId: 'sec-d0', secret: 'c2VjcmV0LXBhc3NwaHJhc2U=' }], config: parseOfflineConfig({ vcpus: 1, ramMiB: 128 }), socketDir: join(dir, 'dry'), dryRun: true, host: kvmHost, accel: 'tcg', serial: 'stdio', extraArgs: ['-kernel', '/boot/vmlinuz'] });
  assert.equal(r.exitCode, undefined);
  assert.equal(r.guestAgentSocket, join(dir, 'dry', 'qga.sock'));
  const s = r.argv.join(' ');
  assert.ok(s.includes(`-chardev socket,id=qga0,path=${join(dir, 'dry', 'qga.sock')},server=on,wait=off`));
  assert.match(s, /-accel tcg -cpu max/);
  assert.match(s, /-serial stdio/);
  assert.ok(s.endsWith('-kernel /boot/vmlinuz'));
  assert.ok(!s.includes('c2VjcmV0LXBhc3NwaHJhc2U='));
});

test('installed QEMU opens a real LUKS qcow2 chain (one secret per layer, the base read-only) from the command line: paused TCG start, QMP stop', async () => {
  const files = chainFiles(join(dir, 'chain'));
  mkdirSync(join(dir, 'chain'), { recursive: true });
  const secret = randomBytes(32).toString('base64');
  const baseSecret = randomBytes(32).toString('base64');
  await createChain({ files, secret, baseSecret }, 4 << 20, 256 << 10);
  const spec = { files, secretId: 'sec-d0', baseSecretId: 'sec-d0-base', baseReadOnly: true, prefix: 'd0' };
  let blockInfo: unknown;
  let agentGaveUpMs = -1;
  const r = await runDesktop({
    name: 'paused',
    disks: [{ name: 'disk0', blockdev: chainBlockdev(spec), secretId: 'sec-d0', secret, baseSecretId: 'sec-d0-base', baseSecret }],
    config: parseOfflineConfig({ vcpus: 1, ramMiB: 128, nic: 'none' }),
    socketDir: join(dir, 'vm'),
    display: 'none',
    paused: true,
    accel: 'tcg',
    host: { ...hostFacts(), kvm: false },
    stdio: 'ignore',
    onStarted: (vm) => {
      void (async () => {
        blockInfo = await vm.qmp('query-named-block-nodes');
        // QEMU listens on the agent's channel; a paused guest runs no agent, so the client gives up within its bound.
        assert.equal(vm.guestAgentSocket, join(dir, 'vm', 'qga.sock'));
        const t0 = Date.now();
        await assert.rejects(GuestAgent.connect(vm.guestAgentSocket!, 300), GuestAgentUnavailable);
        agentGaveUpMs = Date.now() - t0;
        const status = (await vm.qmp('query-status')) as { status: string };
        assert.equal(status.status, 'prelaunch');
        // A paused guest ignores ACPI power-down: stop() must fall back to QMP quit.
        await vm.stop(300);
      })();
    },
  });
  assert.equal(r.exitCode, 0);
  assert.ok(agentGaveUpMs >= 250 && agentGaveUpMs < 2_000, `no agent costs the timeout: ${agentGaveUpMs} ms`);
  assert.match(JSON.stringify(blockInfo), /"encrypted":true/);
  assert.match(JSON.stringify(blockInfo), /top\.qcow2/);
  const base = (blockInfo as { 'node-name': string; ro: boolean }[]).find((n) => n['node-name'] === 'd0-base');
  assert.equal(base?.ro, true, 'a complete base is read-only under the running desktop');
});

test('a wrong disk passphrase makes QEMU fail at start with its own words, not hang', async () => {
  const files = chainFiles(join(dir, 'chain'));
  await assert.rejects(
    runDesktop({
      name: 'wrong', disks: [{ name: 'disk0', blockdev: chainBlockdev({ files, secretId: 'sec-d0', prefix: 'd0' }), secretId: 'sec-d0', secret: randomBytes(32).toString('base64') }],
      config: parseOfflineConfig({ vcpus: 1, ramMiB: 128, nic: 'none' }), socketDir: join(dir, 'vm2'), display: 'none', paused: true, accel: 'tcg', stdio: 'ignore',
    }),
    /QEMU exited at start/i,
  );
});
