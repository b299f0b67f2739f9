import assert from 'node:assert/strict';
import { createHmac, randomBytes, timingSafeEqual } from 'node:crypto';
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { pendingEvents } from '../../src/live/disks/events.js';
import { writePolicy, usbRuleSets } from '../../src/client/vault/guards.js';
import { startRunDevices } from '../../src/client/devices/run-devices.js';
import type { HeldDesktop } from '../../src/live/fill/holder.js';
import { hardwareFacts } from '../../src/devices/hardware.js';
import { listHostUsb } from '../../src/devices/usb-host.js';
import { emulatedDevices, UsbHotplug, type UsbAction } from '../../src/devices/usb-hotplug.js';
import { decide, parseUsbId, type UsbRules } from '../../src/devices/usb-rules.js';
import { hostFacts } from '../../src/hypervisor/host.js';
import { runDesktop } from '../../src/hypervisor/launch-desktop.js';
import { parseOfflineConfig, type RunningDesktop } from '../../src/hypervisor/launch.js';
import { ControlClient, serveControl, type ControlKey } from '../../src/live/control.js';

// USB by policy on a real QEMU: the run's own command line (xhci controller), started paused (-S):
// hot-plug needs no guest. QEMU's emulated devices stand in for the host's (usb-storage, usb-kbd).
const dir = mkdtempSync(join(tmpdir(), 'carryon-usb-'));
const sysfs = join(dir, 'sys');
let vm: RunningDesktop;
let ended: Promise<unknown>;

/** A sysfs tree as the kernel lays it out: devices `B-P`, interfaces `B-P:C.I`, root hubs `usbN`. */
function fakeDevice(name: string, attrs: Record<string, string | number>, interfaces: string[] = []): void {
  mkdirSync(join(sysfs, name), { recursive: true });
  for (const [k, v] of Object.entries(attrs)) writeFileSync(join(sysfs, name, k), `${v}\n`);
  interfaces.forEach((cls, i) => {
    mkdirSync(join(sysfs, `${name}:1.${i}`), { recursive: true });
    writeFileSync(join(sysfs, `${name}:1.${i}`, 'bInterfaceClass'), `${cls}\n`);
  });
}

const KEYBOARD = '046d:c31c';
const STICK = '0781:5567';
const COMPOSITE = '1234:5678';

before(async () => {
  fakeDevice('usb1', { idVendor: '1d6b', idProduct: '0003', bDeviceClass: '09', busnum: 1, devnum: 1 });
  fakeDevice('1-1', { idVendor: '046d', idProduct: 'c31c', bDeviceClass: '00', busnum: 1, devnum: 2, manufacturer: 'Logitech', product: 'Keyboard K120' }, ['03']);
  fakeDevice('1-2', { idVendor: '0781', idProduct: '5567', bDeviceClass: '00', busnum: 1, devnum: 3, product: 'Cruzer Blade' }, ['08']);
  // A keyboard that is also a disk: storage on any interface counts.
  fakeDevice('1-3', { idVendor: '1234', idProduct: '5678', bDeviceClass: '00', busnum: 1, devnum: 4 }, ['03', '08']);
  fakeDevice('1-4', { idVendor: '05e3', idProduct: '0610', bDeviceClass: '09', busnum: 1, devnum: 5 }); // a hub
  fakeDevice('1-5', { idVendor: 'zz', idProduct: '0001', busnum: 1, devnum: 6 }); // does not read whole
  const started = new Promise<RunningDesktop>((resolve, reject) => {
    ended = runDesktop({
      name: 'usb',
      disks: [{ name: 'disk0', blockdev: { driver: 'null-co', 'node-name': 'd0-top', size: 1 << 20 }, secretId: 'sec-d0', secret: 'c2VjcmV0' }],
      config: parseOfflineConfig({ vcpus: 1, ramMiB: 128, nic: 'none', usb: true }),
      socketDir: join(dir, 'vm'), display: 'none', paused: true, accel: 'tcg', host: { ...hostFacts(), kvm: false }, stdio: 'ignore',
      onStarted: resolve,
    }).catch(reject);
  });
  vm = await started;
});

after(async () => {
  await vm?.qmp('quit').catch(() => undefined);
  await ended;
  rmSync(dir, { recursive: true, force: true });
});

const rules = (r: Partial<UsbRules> = {}): UsbRules => ({ allowed: true, classes: ['*'], allow: [], deny: [], storage: true, printers: true, ...r });
const dev = (id: string, classes: string[]) => ({ ...parseUsbId(id), classes });

async function peripherals(): Promise<string[]> {
  const list = (await vm.qmp('qom-list', { path: '/machine/peripheral' })) as { name: string; type: string }[];
  return list.filter((p) => p.type.startsWith('child<usb-')).map((p) => p.name);
}

test('the rules: off means nothing; deny wins; storage is refused on any interface, even when listed; classes or the allow list let a device through; every rule set must agree', () => {
  assert.equal(decide([rules({ allowed: false })], dev(KEYBOARD, ['03'])).ok, false);
  assert.equal(decide([rules()], dev(STICK, ['08'])).ok, true, 'usbAllowed alone: any device, as before');
  assert.match((decide([rules({ storage: false })], dev(STICK, ['08'])) as { why: string }).why, /mass-storage/);
  assert.equal(decide([rules({ storage: false, allow: [STICK] })], dev(STICK, ['08'])).ok, false, 'the allow list does not override no-storage');
  assert.equal(decide([rules({ storage: false })], dev(COMPOSITE, ['03', '08'])).ok, false, 'a keyboard with a disk inside is storage');
  assert.equal(decide([rules({ deny: ['046d:*'], allow: [KEYBOARD] })], dev(KEYBOARD, ['03'])).ok, false, 'deny wins over allow');
  assert.equal(decide([rules({ classes: ['03'] })], dev(KEYBOARD, ['03'])).ok, true);
  assert.match((decide([rules({ classes: ['03'] })], dev('04a9:1234', ['07'])) as { why: string }).why, /printer \(07\)/);
  assert.equal(decide([rules({ classes: ['03'], allow: ['04a9:*'] })], dev('04a9:1234', ['07'])).ok, true, 'a listed vendor passes whatever its class');
  assert.equal(decide([rules({ classes: [] })], dev(KEYBOARD, [])).ok, false);
  assert.equal(decide([rules(), rules({ storage: false })], dev(STICK, ['08'])).ok, false, 'the agent\'s later rules narrow the check-out\'s');
  assert.equal(decide([], dev(KEYBOARD, ['03'])).ok, false);
  // A USB printer is printing's business: refused where printing is not allowed, even when listed.
  assert.match((decide([rules({ printers: false, allow: ['04a9:*'] })], dev('04a9:1234', ['07'])) as { why: string }).why, /printer and the policy does not allow printing/);
  assert.equal(decide([rules({ printers: true })], dev('04a9:1234', ['07'])).ok, true);
  assert.throws(() => parseUsbId('046d-c31c'), { code: 'invalid' });
  assert.deepEqual(parseUsbId(' 046D:C31C '), { vendorId: '046d', productId: 'c31c' });
});

test('host devices from sysfs: IDs, bus and address, every class of the device and its interfaces; root hubs, hubs and unreadable entries left out', async () => {
  const list = await listHostUsb(sysfs);
  assert.deepEqual(list.map((d) => [d.port, `${d.vendorId}:${d.productId}`, d.bus, d.address, d.classes.join(',')]), [
    ['1-1', KEYBOARD, 1, 2, '03'], ['1-2', STICK, 1, 3, '08'], ['1-3', COMPOSITE, 1, 4, '03,08'],
  ]);
  assert.equal(list[0]!.product, 'Keyboard K120');
  assert.deepEqual(await listHostUsb(join(dir, 'no-such-bus')), []);
});

test('hardware facts for the agent: window system, connected monitors, USB IDs and classes (no serial numbers)', async () => {
  const drm = join(dir, 'drm');
  for (const [name, status] of [['card0-eDP-1', 'connected'], ['card0-HDMI-A-1', 'disconnected'], ['card1-DP-2', 'connected']]) {
    mkdirSync(join(drm, name!), { recursive: true });
    writeFileSync(join(drm, name!, 'status'), `${status}\n`);
  }
  mkdirSync(join(drm, 'card0'), { recursive: true });
  const hw = await hardwareFacts({ usbRoot: sysfs, drmRoot: drm, env: { WAYLAND_DISPLAY: 'wayland-0' }, gl: false });
  assert.deepEqual(hw.display, { windowSystem: 'wayland', monitors: 2, gl: false });
  assert.deepEqual(hw.usb.map((u) => `${u.id} ${u.classes.join(',')}`), [`${KEYBOARD} 03`, `${STICK} 08`, `${COMPOSITE} 03,08`]);
  assert.equal(hw.usb[0]!.name, 'Logitech Keyboard K120');
  assert.deepEqual((await hardwareFacts({ usbRoot: join(dir, 'none'), drmRoot: join(dir, 'none'), env: {} })).display, { windowSystem: null, monitors: 0, gl: null });
});

test('hot-plug into the running QEMU by policy: storage refused where the policy forbids it (and recorded), allowed → attached; a policy change detaches it at once', async () => {
  let current = rules({ storage: false });
  const events: [UsbAction, string][] = [];
  const hp = new UsbHotplug(vm.connection, { rules: async () => [current], devices: () => listHostUsb(sysfs), record: async (a, d) => void events.push([a, d]), log: () => undefined, backend: emulatedDevices });
  await assert.rejects(hp.attach('0781', '5567'), { code: 'policy', message: /mass-storage device and the policy does not allow USB storage/ });
  assert.deepEqual(await peripherals(), [], 'nothing reached QEMU');
  assert.equal(events.at(-1)![0], 'usb-refused');
  await assert.rejects(hp.attach('dead', 'beef'), { code: 'not-found' });

  const kbd = await hp.attach('046d', 'c31c');
  current = rules({ storage: true });
  const stick = await hp.attach('0781', '5567');
  assert.deepEqual((await peripherals()).sort(), [kbd.id, stick.id].sort());
  assert.match(JSON.stringify(await vm.qmp('x-query-usb')), /QEMU USB MSD/);
  await assert.rejects(hp.attach('0781', '5567'), { code: 'already-attached' });

  current = rules({ storage: false });
  const removed = await hp.enforce();
  assert.deepEqual(removed.map((r) => r.id), [stick.id]);
  assert.deepEqual(await peripherals(), [kbd.id], 'QEMU shows the stick gone, the keyboard kept');
  assert.deepEqual(events.map((e) => e[0]), ['usb-refused', 'usb-attach', 'usb-attach', 'usb-detach']);
  assert.match(events.at(-1)![1], /^0781:5567 \(Cruzer Blade\) at 1-3: policy changed: .*mass-storage/);

  await hp.detach('046d', 'c31c');
  assert.deepEqual(await peripherals(), []);
  await assert.rejects(hp.detach('046d', 'c31c'), { code: 'not-found' });
});

function keyOf(secret: Buffer): ControlKey {
  const mac = (data: string) => createHmac('sha256', secret).update(data).digest('hex');
  return { sign: mac, verify: (data, m) => m.length === 64 && timingSafeEqual(Buffer.from(mac(data), 'hex'), Buffer.from(m, 'hex')) };
}

test('the holder: attach over its MACed control socket; the agent\'s policy.json arriving while the desktop runs detaches the stick at once; every step is in the offline events for the broker', async () => {
  const home = join(dir, 'home');
  const desktopDir = join(dir, 'desktop');
  mkdirSync(home, { recursive: true });
  mkdirSync(desktopDir, { recursive: true });
  process.env.CARRYON_TEST_USB_SYSFS = sysfs;
  process.env.CARRYON_TEST_USB_EMULATED = '1';
  // What run holds: the check-out's MACed config (USB allowed, any device) and the user's local-config.json.
  const held = {
    vault: { desktopDir: () => desktopDir },
    state: { desktopId: 'desk-1', config: { usb: true, usbRules: { classes: ['*'], allow: [], deny: [], storage: true } }, localConfig: { usbDevices: [{ vendorId: '046d', productId: 'c31c' }] } },
  } as unknown as HeldDesktop;
  const logs: string[] = [];
  const devices = await startRunDevices(held, { qmp: vm.connection, guestAgentSocket: null }, { home, log: (l) => logs.push(l) });
  const secret = randomBytes(32);
  const noop = async () => { throw new Error('not in this test'); };
  const server = await serveControl(join(dir, 'live.sock'), { freeze: noop, fold: noop, abandon: noop, shutdown: noop, status: noop, ...devices.handler }, keyOf(secret), () => undefined);
  const control = await ControlClient.connect(join(dir, 'live.sock'), keyOf(secret));
  try {
    assert.deepEqual((await control.usbList()).map((d) => `${d.vendorId}:${d.productId}`), [KEYBOARD], 'local-config.json\'s device went in at start');
    const stick = await control.usbAttach('0781', '5567');
    assert.equal(stick.name, 'Cruzer Blade');
    assert.ok((await peripherals()).includes(stick.id));

    // The agent learns a policy without storage from the broker and writes it, as agent.ts does.
    await writePolicy(desktopDir, { usbAllowed: true, usb: { classes: ['*'], allow: [], deny: [], storage: false } });
    const t0 = Date.now();
    while (((await peripherals()).includes(stick.id) || (await pendingEvents(home)).events.length < 3) && Date.now() - t0 < 4_000) await new Promise((r) => setTimeout(r, 50));
    assert.ok(!(await peripherals()).includes(stick.id), `the stick is detached within 4 s of the policy change (the poll is 5 s: this is the watch)\n${logs.join('\n')}`);
    assert.deepEqual((await control.usbList()).map((d) => `${d.vendorId}:${d.productId}`), [KEYBOARD]);
    await assert.rejects(control.usbAttach('0781', '5567'), { code: 'policy' });
    await assert.rejects(control.usbAttach('1234', '5678'), { code: 'policy' }, 'a composite keyboard with storage');
    assert.equal((await usbRuleSets(desktopDir, held.state.config)).length, 2);

    // Policy off: everything goes.
    await writePolicy(desktopDir, { usbAllowed: false });
    const t1 = Date.now();
    // Gone from QEMU first, then recorded: wait for both.
    while (((await peripherals()).length || (await pendingEvents(home)).events.length < 6) && Date.now() - t1 < 4_000) await new Promise((r) => setTimeout(r, 50));
    assert.deepEqual(await peripherals(), []);

    const events = (await pendingEvents(home)).events;
    assert.deepEqual(events.map((e) => e.action), ['usb-attach', 'usb-attach', 'usb-detach', 'usb-refused', 'usb-refused', 'usb-detach']);
    assert.ok(events.every((e) => e.desktopId === 'desk-1'));
    assert.match(events[2]!.detail!, /0781:5567.*policy changed/);
  } finally {
    control.close();
    await server.close();
    devices.close();
    delete process.env.CARRYON_TEST_USB_SYSFS;
    delete process.env.CARRYON_TEST_USB_EMULATED;
  }
});
