import assert from 'node:assert/strict';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, test } from 'node:test';
import { checkRange, type BlockDevice } from '../../src/disk/block-device.js';
import { ValidationError } from '../../src/core/errors.js';
import { freeDiskBytes, hostFacts } from '../../src/hypervisor/host.js';
import { runDesktop } from '../../src/hypervisor/launch-desktop.js';
import { buildQemuCommand, formatCommand, parseOfflineConfig } from '../../src/hypervisor/launch.js';

const dir = mkdtempSync(join(tmpdir(), 'carryon-launch-'));
after(() => rmSync(dir, { recursive: true, force: true }));
const kvmHost = { cpus: 8, ramBytes: 16 * 2 ** 30, kvm: true };
const tcgHost = { cpus: 2, ramBytes: 4 * 2 ** 30, kvm: false };
const disks = [{ name: 'disk0', socketPath: '/run/c/nbd.sock' }, { name: 'data', socketPath: '/run/c/nbd.sock' }];
const opts = { name: 'win11', qmpSocket: '/run/c/qmp.sock' };

/** In-memory disk that counts flushes (the launcher must flush on exit). */
class MemoryDevice implements BlockDevice {
  readonly readOnly = false;
  flushes = 0;
  constructor(private readonly data: Buffer) {}
  get size() { return this.data.length; }
  async read(o: number, n: number) { checkRange(this.size, o, n); return Buffer.from(this.data.subarray(o, o + n)); }
  async write(o: number, d: Buffer) { checkRange(this.size, o, d.length); d.copy(this.data, o); }
  async writeZeroes(o: number, n: number) { checkRange(this.size, o, n); this.data.fill(0, o, o + n); }
  async trim(o: number, n: number) { await this.writeZeroes(o, n); }
  async flush() { this.flushes++; }
  async close() {}
}

test('KVM host: kvm accel, host CPU, NBD blockdevs, user NIC, QMP, no USB unless allowed', () => {
  const argv = buildQemuCommand(parseOfflineConfig({ vcpus: 4, ramMiB: 4096, usb: false, nic: 'user' }), kvmHost, disks, opts);
  const s = argv.join(' ');
  assert.equal(argv[0], 'qemu-system-x86_64');
  assert.match(s, /-accel kvm -cpu host -smp 4 -m 4096M/);
  assert.match(s, /-blockdev driver=nbd,node-name=disk0,server.type=unix,server.path=\/run\/c\/nbd.sock,export=disk0/);
  assert.match(s, /-device virtio-blk-pci,drive=disk0,bootindex=0 .*-device virtio-blk-pci,drive=disk1 /);
  assert.match(s, /-nic user,model=virtio-net-pci/);
  assert.match(s, /-qmp unix:\/run\/c\/qmp.sock,server=on,wait=off/);
  assert.doesNotMatch(s, /hostfwd|usb-host|qemu-xhci|-S\b/);
});

test('TCG host: clamps vCPUs and RAM to the host; USB devices only when policy allows; no NIC', () => {
  const usb = [{ vendorId: '046d', productId: 'c52b' }];
  const argv = buildQemuCommand(parseOfflineConfig({ vcpus: 8, ramMiB: 16384, usb: true, nic: 'none', usbDevices: usb, display: 'sdl' }), tcgHost, disks, { ...opts, paused: true });
  const s = argv.join(' ');
  assert.match(s, /-accel tcg -smp 2 -m 3072M/);
  assert.doesNotMatch(s, /-cpu host/);
  assert.match(s, /-nic none/);
  assert.match(s, /-display sdl/);
  assert.match(s, /-device qemu-xhci,id=xhci -device usb-host,bus=xhci.0,vendorid=0x046d,productid=0xc52b/);
  assert.equal(argv.at(-1), '-S');
  const denied = buildQemuCommand(parseOfflineConfig({ vcpus: 1, ramMiB: 512, usb: false, usbDevices: usb }), tcgHost, disks, opts).join(' ');
  assert.doesNotMatch(denied, /usb/);
});

test('bad config and unsafe names are refused', () => {
  assert.throws(() => parseOfflineConfig({ vcpus: 0, ramMiB: 512 }), ValidationError);
  assert.throws(() => parseOfflineConfig({ vcpus: 1, ramMiB: 512, display: 'gtk -device evil' }), ValidationError);
  const c = parseOfflineConfig({ vcpus: 1, ramMiB: 512 });
  assert.throws(() => buildQemuCommand(c, tcgHost, [{ name: 'a,b', socketPath: '/s' }], opts), ValidationError);
  assert.throws(() => buildQemuCommand(c, tcgHost, [{ name: 'a', socketPath: '/s,x' }], opts), ValidationError);
  assert.throws(() => buildQemuCommand(c, tcgHost, [], opts), ValidationError);
  assert.equal(formatCommand(['a b', "it's", 'x=1,y']), `'a b' 'it'\\''s' x=1,y`);
});

test('host facts', async () => {
  const h = hostFacts();
  assert.ok(h.cpus >= 1 && h.ramBytes > 0);
  assert.ok((await freeDiskBytes(dir)) > 0);
});

test('dry run builds the argv without starting anything', async () => {
  const dev = new MemoryDevice(Buffer.alloc(1 << 20));
  const r = await runDesktop({ name: 'dry', disks: [{ name: 'disk0', device: dev }], config: parseOfflineConfig({ vcpus: 1, ramMiB: 128 }), socketDir: join(dir, 'dry'), dryRun: true, host: tcgHost });
  assert.equal(r.exitCode, undefined);
  assert.match(r.argv.join(' '), /server.path=.*dry\/nbd.sock,export=disk0/);
});

test('installed QEMU accepts the command line: paused TCG start over our NBD export, QMP stop, disks flushed', async () => {
  const dev = new MemoryDevice(Buffer.alloc(4 << 20));
  let blockInfo: unknown;
  const r = await runDesktop({
    name: 'paused',
    disks: [{ name: 'disk0', device: dev }],
    config: parseOfflineConfig({ vcpus: 1, ramMiB: 128, nic: 'none' }),
    socketDir: join(dir, 'vm'),
    display: 'none',
    paused: true,
    host: { ...hostFacts(), kvm: false },
    stdio: 'ignore',
    onStarted: (vm) => {
      void (async () => {
        blockInfo = await vm.qmp('query-block');
        const status = (await vm.qmp('query-status')) as { status: string };
        assert.equal(status.status, 'prelaunch');
        // A paused guest ignores ACPI power-down: stop() must fall back to QMP quit.
        await vm.stop(300);
      })();
    },
  });
  assert.equal(r.exitCode, 0);
  assert.match(JSON.stringify(blockInfo), /nbd/);
  assert.ok(dev.flushes >= 1, 'disks flushed after QEMU exited');
});
