// carryon-test: serial (a TCG guest boots: one file at a time on the 2 cores)
// carryon-test: sqlite-only (the host, the guest and the browser are the subject; the broker's database side runs on PostgreSQL in broker/hosts and broker/display)
import assert from 'node:assert/strict';
import { existsSync, mkdtempSync, readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import type { Browser, Page } from 'playwright-core';
import { checkout as laptopCheckout, enroll, type ClientEnv } from '../../src/client/ops.js';
import { hostSocketDir } from '../../src/host/keys.js';
import { startHost, type RunningHost } from '../../src/host/service.js';
import { ADMIN, api, cleanup, testBroker, type Api, type TestBroker } from '../broker/harness.js';
import { makeDesktopDisk, readDataFile, type DesktopDisk } from '../support/desktop-disk.js';
import { GUEST_DONE, GUEST_POWER_BUTTON, GUEST_SHELL } from '../support/guest.js';
import { readDesktop } from '../support/laptop.js';
import { axe, launch, noBrowser, screenshotDir } from './browser.js';

process.env.CARRYON_SCRYPT_N = '1024';

/**
 * An online desktop end to end (issue 26): a real Linux guest (the test guest on a disk that boots
 * as a desktop's does: MBR, syslinux, kernel and initramfs, ext4 data) is powered on and boots on a
 * desktop host (TCG) from its chain alone; Alice opens it from My desktops: the canvas follows the
 * boot, what she types reaches the guest's shell on its VGA console (PS/2 keyboard through QEMU's
 * VNC, the broker's relay and noVNC), and the command writes a file. Her laptop then checks the
 * desktop out: the host shuts the guest down by ACPI and the laptop's copy holds the file. One boot.
 */
let broker: TestBroker;
let http: Api;
let admin: string;
let host: RunningHost | null = null;
let browser: Browser | null = null;
let disk: DesktopDisk;
let hostDir = '';
let desktopId = '';
const dirs: string[] = [];
const TYPED = 'typed-in-the-browser';
/** The guest's serial console (the host writes it beside the desktop's QMP socket): /init's markers. */
const serial = async () => {
  const path = join(await hostSocketDir(hostDir, desktopId), 'serial.log');
  return existsSync(path) ? readFileSync(path, 'utf8') : '';
};

before(async () => {
  if (noBrowser) return;
  broker = await testBroker();
  http = api(broker.url, broker.fingerprint);
  admin = await http.login(ADMIN.name, ADMIN.password);
  assert.equal((await http.call('POST', '/v1/admin/users', { name: 'alice', password: 'alice-password' }, admin)).status, 201);
  // The guest's work after booting: a shell on tty1 (the VGA console) in its data disk, until the power button.
  disk = await makeDesktopDisk(join(broker.dir, 'office.raw'), { actions: [{ shell: '/dev/tty1' }] });
  const created = await http.call('POST', '/v1/admin/desktops', { name: 'office', image: disk.path, config: { vcpus: 1, ramMiB: 256, minRamMiB: 128, nic: 'none' } }, admin);
  assert.equal(created.status, 201, JSON.stringify(created.body));
  assert.equal((await http.call('POST', '/v1/admin/entitlements', { principalType: 'user', principal: 'alice', targetType: 'desktop', target: 'office' }, admin)).status, 201);
  desktopId = (await broker.ctx.meta.getDesktop('office'))!.id;
  hostDir = mkdtempSync(join(tmpdir(), 'carryon-host-'));
  dirs.push(hostDir);
  host = await startHost({ id: 'h1', brokerUrl: broker.url, brokerFingerprint: broker.fingerprint, secret: readFileSync(join(broker.dir, 'host.secret'), 'utf8').trim(), dataDir: hostDir, vcpus: 2, ramMiB: 2048, maxDesktops: 1, accel: 'tcg', heartbeatSec: 5, shutdownGraceSec: 60, replicateSec: 0 });
  browser = await launch();
});
after(async () => {
  if (noBrowser) return;
  await browser?.close();
  await host?.close();
  await http.close();
  await broker.close();
  cleanup(broker.dir);
  for (const d of dirs) cleanup(d);
});

async function until<T>(what: string, probe: () => Promise<T | null | undefined | false>, ms: number): Promise<T> {
  for (const end = Date.now() + ms; Date.now() < end; await new Promise((r) => setTimeout(r, 200))) {
    const v = await probe();
    if (v) return v;
  }
  throw new Error(`timed out after ${ms / 1000} s waiting for ${what}; the guest's serial console:\n${(await serial()).slice(-2000)}`);
}

/** The canvas as the page has drawn it: its size, a hash of its pixels and how many are lit. */
const canvasFrame = (page: Page) => page.evaluate(() => {
  const c = document.querySelector('.display-screen canvas') as HTMLCanvasElement | null;
  const d = c?.getContext('2d')?.getImageData(0, 0, c.width, c.height).data;
  let hash = 2166136261;
  let lit = 0;
  for (let i = 0; d && i < d.length; i += 4) {
    hash = Math.imul(hash ^ (d[i]! | (d[i + 1]! << 8) | (d[i + 2]! << 16)), 16777619) >>> 0;
    if (d[i]! + d[i + 1]! + d[i + 2]! > 300) lit++;
  }
  return { size: `${c?.width ?? 0}x${c?.height ?? 0}`, hash, lit };
});

/**
 * Types `text` as keystrokes on the focused screen. Playwright's `type` sends a character's key
 * without Shift, and noVNC sends QEMU the key's scancode, so a shifted character is pressed as the
 * user does: Shift held.
 */
async function typeKeys(page: Page, text: string): Promise<void> {
  const shifted: Record<string, string> = { '>': 'Period', '<': 'Comma', '|': 'Backslash', '"': 'Quote', ':': 'Semicolon' };
  for (const ch of text) {
    if (shifted[ch]) await page.keyboard.press(`Shift+${shifted[ch]}`);
    else await page.keyboard.type(ch);
    // The guest drains QEMU's PS/2 queue at TCG speed.
    await new Promise((r) => setTimeout(r, 15));
  }
}

let page: Page;

test('power on: the desktop boots on the host from its own disk; Open shows its screen as it boots, and a command typed in the page runs in the guest and writes a file', { skip: noBrowser }, async () => {
  // The browser first, on My desktops, so the screen opens within seconds of QEMU starting.
  const ctx = await browser!.newContext({ ignoreHTTPSErrors: true, bypassCSP: true, viewport: { width: 1280, height: 800 } }); // CSP under noVNC: display.test's subject; here axe is injected
  page = await ctx.newPage();
  page.setDefaultTimeout(60_000);
  await page.goto(broker.url);
  await page.getByLabel('User name').fill('alice');
  await page.getByLabel('Password').fill('alice-password');
  await page.getByRole('button', { name: 'Log in' }).click();
  const t0 = Date.now();
  assert.equal((await http.call('POST', '/v1/admin/desktops/office/power', { action: 'on' }, admin)).status, 200);
  await until('office running', async () => (await broker.ctx.hosts.placement(desktopId))?.state === 'running', 60_000);
  const started = (Date.now() - t0) / 1000;
  await page.getByRole('button', { name: 'Open the screen of office' }).click();
  await page.getByRole('status').filter({ hasText: 'Connected' }).waitFor();
  // The first frame the page drew (QEMU's screen, the BIOS, the boot loader: whatever the boot is at), before the guest's shell is up.
  const early = await until('a first frame', async () => {
    const f = await canvasFrame(page);
    return f.lit > 0 ? f : null;
  }, 20_000);
  assert.ok(!(await serial()).includes(GUEST_SHELL), 'the first frame came before the guest had booted');
  await until("the guest's shell on tty1", async () => (await serial()).includes(`${GUEST_SHELL} /dev/tty1`), 90_000);
  const booted = (Date.now() - t0) / 1000;
  // The shell's prompt reaches the canvas: the frame is no longer the early one.
  const late = await until('the screen to change', async () => {
    const f = await canvasFrame(page);
    return f.hash !== early.hash ? f : null;
  }, 20_000);
  assert.notEqual(late.hash, early.hash);

  // Keystrokes: the canvas has focus (a click, as a user's), the command runs in the guest's shell.
  await page.locator('.display-screen canvas').click();
  await typeKeys(page, `echo ${TYPED} > typed.txt; sync; echo carryon-typed > /dev/console`);
  await page.keyboard.press('Enter');
  await until('the typed command to run in the guest', async () => /^carryon-typed\r?$/m.test(await serial()), 30_000);
  const typed = await canvasFrame(page);
  assert.notEqual(typed.hash, late.hash, 'the typed command shows on the screen');
  process.stdout.write(`# online guest: placed and QEMU started in ${started.toFixed(1)} s, shell up at ${booted.toFixed(1)} s, frames ${early.size}/${early.lit} lit → ${late.size}/${late.lit} lit → ${typed.size}/${typed.lit} lit\n`);

  const v = await axe(page);
  assert.deepEqual(v, [], `axe on the display page: ${JSON.stringify(v, null, 1)}`);
  await page.screenshot({ path: join(screenshotDir(broker.dir), 'display.png') });
});

test("check-out to a laptop: the host shuts the guest down by ACPI (not forced), and the laptop's copy holds the file typed in the browser", { skip: noBrowser }, async () => {
  const home = join(broker.dir, 'laptop');
  const logs: string[] = [];
  const env: ClientEnv = { home, user: 'alice', password: async () => 'alice-password', log: (l) => logs.push(l), pollMs: 100 };
  await enroll(env, broker.url, { fingerprint: broker.fingerprint, name: 'alice-laptop' });
  const t0 = Date.now();
  await laptopCheckout(env, 'office');
  const took = (Date.now() - t0) / 1000;
  // The guest saw its power button, ended its shell, unmounted its data disk and powered off.
  const out = await serial();
  assert.ok(out.includes(GUEST_POWER_BUTTON) && out.includes(`${GUEST_DONE} rc=0`), `the guest shut down cleanly:\n${out.slice(-2000)}`);
  const events = (await http.call('GET', '/v1/admin/audit?limit=1000&action=guest-shutdown', undefined, admin)).body.events as { actor: string; outcome: string; detail: string | null }[];
  assert.deepEqual(events.map((e) => [e.actor, e.outcome]), [['host:h1', 'ok']], JSON.stringify(events));
  assert.match(events[0]!.detail ?? '', /^ACPI: shut down \(QEMU exit 0\)/);
  assert.ok(logs.some((l) => /^host h1 is sending back what office wrote/.test(l)), logs.join('\n'));
  // The browser's screen ended with the guest.
  await page.getByRole('status').filter({ hasText: /The display was closed|cut off/ }).waitFor();
  await page.context().close();

  const copy = await readDesktop(env, 'office');
  assert.equal((await readDataFile(copy, disk.data, '/typed.txt')).toString(), `${TYPED}\n`);
  process.stdout.write(`# online guest: check-out with the host's ACPI shutdown and send-back took ${took.toFixed(1)} s\n`);
});
