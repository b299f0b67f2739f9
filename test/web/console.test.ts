import assert from 'node:assert/strict';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import type { Browser, Page } from 'playwright-core';
import type { RunningBroker } from '../../src/broker/start.js';
import { runAgent } from '../../src/client/agent.js';
import { checkout, enroll, upload, type ClientEnv } from '../../src/client/ops.js';
import { RateLimiter } from '../../src/transfer-client/rate-limit.js';
import { ADMIN, api, cleanup, makeImage, testBroker, type Api } from '../broker/harness.js';
import { axe, launch, noBrowser, screenshotDir } from './browser.js';

process.env.CARRYON_SCRYPT_N = '1024';
let broker: RunningBroker & { dir: string };
let http: Api;
let adminToken: string;
let browser: Browser;
let shots: string;

before(async () => {
  if (noBrowser) return;
  broker = await testBroker();
  http = api(broker.url, broker.fingerprint);
  adminToken = await http.login(ADMIN.name, ADMIN.password);
  await http.call('POST', '/v1/admin/users', { name: 'alice', password: 'alice-password' }, adminToken);
  browser = await launch();
  shots = screenshotDir(broker.dir);
});
after(async () => {
  if (noBrowser) return;
  await browser?.close();
  await http.close();
  await broker.close();
  cleanup(broker.dir);
});

async function newPage(): Promise<Page> {
  // The broker's certificate is self-signed (clients pin it); axe is injected past the page's CSP.
  const ctx = await browser.newContext({ ignoreHTTPSErrors: true, bypassCSP: true, viewport: { width: 1360, height: 900 } });
  const page = await ctx.newPage();
  page.setDefaultTimeout(20_000);
  await page.goto(broker.url);
  return page;
}

/** Logs in with the keyboard only: type, Tab to the next field, Enter submits. */
async function logIn(page: Page, user: string, password: string): Promise<void> {
  await page.getByLabel('User name').focus();
  await page.keyboard.type(user);
  await page.keyboard.press('Tab');
  await page.keyboard.type(password);
  await page.keyboard.press('Enter');
  await page.getByRole('navigation', { name: 'Pages' }).waitFor();
}

async function go(page: Page, title: string): Promise<void> {
  await page.getByRole('link', { name: title, exact: true }).click();
  await page.getByRole('heading', { level: 1, name: title }).waitFor();
}

async function accessible(page: Page, where: string): Promise<void> {
  const v = await axe(page);
  assert.deepEqual(v, [], `axe on ${where}: ${JSON.stringify(v, null, 1)}`);
}

const progressValue = (page: Page, row: string) => page.locator(`${row} progress`).first().evaluate((p) => (p as HTMLProgressElement).value);

test('admin console in a real browser: import, live check-out, force-unlock, policy, restore; a user sees only theirs', { skip: noBrowser }, async () => {
  const page = await newPage();
  await accessible(page, 'login');
  await page.screenshot({ path: join(shots, 'login.png') });
  await logIn(page, ADMIN.name, ADMIN.password);

  // Import a desktop from a path on the broker host and watch the progress reach 100%.
  await go(page, 'Desktops & pools');
  const image = makeImage(broker.dir, 64, 'win11.raw');
  const form = page.getByRole('form', { name: 'Import a desktop' });
  await form.getByLabel('Desktop name').fill('win11');
  await form.getByLabel('Image path').fill(image);
  await form.getByRole('button', { name: 'Import' }).click();
  const importRow = page.locator('tr[data-import="win11"]');
  await importRow.getByText('100%').waitFor();
  await importRow.getByText('done').waitFor();
  await page.locator('tr[data-desktop="win11"]').getByText('available').waitFor();
  // A path that is not absolute is refused with the hint that paths are on the broker host.
  await form.getByLabel('Desktop name').fill('relative');
  await form.getByLabel('Image path').fill('images/win11.raw');
  await form.getByRole('button', { name: 'Import' }).click();
  await page.getByRole('alert').getByText(/read on the broker host/).waitFor();
  // Clone it (a desktop alice is not entitled to).
  const clone = page.getByRole('form', { name: 'Clone a desktop' });
  await clone.getByLabel('Golden image').selectOption('win11');
  await clone.getByLabel('New desktop name').fill('secret');
  await clone.getByRole('button', { name: 'Clone' }).click();
  await page.locator('tr[data-desktop="secret"]').waitFor();
  await accessible(page, 'desktops');
  await page.screenshot({ path: join(shots, 'desktops.png'), fullPage: true });

  // Entitle alice on the Users & groups page.
  await go(page, 'Users & groups');
  const ent = page.getByRole('form', { name: 'Add an entitlement' });
  await ent.getByLabel('Principal', { exact: true }).fill('alice');
  await ent.getByLabel('Target', { exact: true }).selectOption({ label: 'win11' });
  await ent.getByRole('button', { name: 'Entitle' }).click();
  await page.getByRole('table', { name: 'Entitlements' }).getByText('desktop win11').waitFor();
  await accessible(page, 'directory');
  await page.screenshot({ path: join(shots, 'directory.png'), fullPage: true });

  // A laptop checks win11 out (rate-limited so it takes a few seconds); the page shows it live.
  await go(page, 'Check-outs & locks');
  const home = join(broker.dir, 'laptop');
  const env: ClientEnv = { home, user: 'alice', password: async () => 'alice-password', log: () => undefined, pollMs: 50 };
  await enroll(env, broker.url, { fingerprint: broker.fingerprint, name: 'alice-laptop' });
  const running = checkout({ ...env, rateLimit: new RateLimiter(2_500_000) }, 'win11');
  const row = 'tr[data-checkout="win11"]';
  await page.locator(row).waitFor();
  let seen = 0;
  for (let i = 0; i < 200 && !(seen > 0 && seen < 100); i++) {
    seen = await progressValue(page, row).catch(() => 0);
    await page.waitForTimeout(100);
  }
  assert.ok(seen > 0 && seen < 100, `progress shown while transferring (${seen}%)`);
  await page.locator(row).getByText(/^(?!0 MB\/s)[\d.]+ MB\/s$/).waitFor();
  await page.screenshot({ path: join(shots, 'checkouts.png'), fullPage: true });
  await go(page, 'Transfers');
  await page.locator('tr[data-job="win11"]').getByText('alice').waitFor();
  await page.locator('tr[data-job="win11"]').getByText(/^(?!0 MB\/s)[\d.]+ MB\/s$/).waitFor();
  await accessible(page, 'transfers');
  await page.screenshot({ path: join(shots, 'transfers.png'), fullPage: true });
  await running;
  await upload(env, 'win11', 'replicate'); // a restore point

  // Devices: the laptop's agent heartbeats (host statistics) and acknowledges a remote command.
  await go(page, 'Devices');
  await page.getByRole('table', { name: 'Devices' }).getByText('alice-laptop').waitFor();
  const cmd = page.getByRole('form', { name: 'Send a remote command' });
  await cmd.getByLabel('Device').selectOption({ label: 'alice-laptop (alice)' });
  await cmd.getByLabel('Command').selectOption('renew-lease');
  await cmd.getByRole('button', { name: 'Send' }).click();
  const commands = page.getByRole('table', { name: 'Commands' });
  await commands.getByText('waiting for the agent').waitFor();
  assert.equal((await runAgent(env, { once: true })).commands, 1);
  await commands.locator('tr', { hasText: 'renew-lease' }).getByText('done', { exact: true }).waitFor();
  const devRow = page.getByRole('table', { name: 'Devices' }).locator('tr', { hasText: 'alice-laptop' });
  await devRow.getByText('just now').waitFor();
  await devRow.getByText(/win11: checked_out, 100% local/).waitFor();
  await accessible(page, 'devices');
  await page.screenshot({ path: join(shots, 'devices.png'), fullPage: true });

  // Force-unlock with a reason.
  await go(page, 'Check-outs & locks');
  await page.locator(row).getByText('checked out').waitFor();
  await accessible(page, 'checkouts');
  await page.getByRole('button', { name: 'Force-unlock win11' }).click();
  await page.getByLabel('Reason (goes to the audit trail)').fill('laptop stolen');
  await page.getByRole('button', { name: 'Force-unlock', exact: true }).click();
  await page.locator(row).waitFor({ state: 'detached' });
  await page.getByText('no desktop is checked out').waitFor();

  // Policies: the layers side by side; a desktop value wins over the default.
  await go(page, 'Policies');
  await page.getByLabel('Desktop', { exact: true }).selectOption({ label: 'win11' });
  await page.getByLabel('User', { exact: true }).selectOption('alice');
  const lease = page.locator('tr[data-policy="maxLeaseHours"]');
  await lease.locator('td.source').getByText('default').waitFor();
  const change = page.getByRole('form', { name: 'Change a policy value' });
  await change.getByLabel('Layer').selectOption({ label: 'Desktop win11' });
  await change.getByLabel('Policy').selectOption('maxLeaseHours');
  await change.getByLabel('Value').fill('48');
  await change.getByRole('button', { name: 'Save' }).click();
  await lease.locator('td.effective').getByText('48').waitFor();
  await lease.locator('td.source').getByText('desktop win11').waitFor();
  // Let alice restore her own desktops (used below).
  await change.getByLabel('Policy').selectOption('restoreAllowed');
  await change.getByLabel('Value').selectOption('true');
  await change.getByRole('button', { name: 'Save' }).click();
  await page.locator('tr[data-policy="restoreAllowed"] td.source').getByText('desktop win11').waitFor();
  await accessible(page, 'policies');
  await page.screenshot({ path: join(shots, 'policies.png'), fullPage: true });

  // Restore points: the import becomes current again.
  await go(page, 'Desktops & pools');
  await page.getByRole('button', { name: 'Restore points of win11' }).click();
  const points = page.getByRole('table', { name: 'Restore points of win11' });
  await points.getByText('replica').waitFor();
  await points.locator('tr', { hasText: 'import' }).getByRole('button', { name: /^Restore import/ }).click();
  await page.getByRole('button', { name: 'Confirm restore' }).click();
  await page.getByRole('status').getByText(/now runs the import/).waitFor();
  await points.locator('tr', { hasText: 'restore' }).getByText('current').waitFor();
  await accessible(page, 'restore points');
  const detail = await http.call('GET', '/v1/admin/desktops/win11', undefined, adminToken);
  const snaps = detail.body.snapshots as { id: string; kind: string }[];
  assert.equal(snaps.find((s) => s.id === detail.body.currentSnapshot)?.kind, 'restore');

  // The audit trail (newest first).
  await go(page, 'Audit');
  await page.getByRole('table', { name: 'Audit events' }).getByText('laptop stolen', { exact: false }).waitFor();
  // Newest first: the restore done last comes before the force-unlock done earlier (background events,
  // such as a transfer server's chunk-access summary, may land on top at any moment).
  const actions = await page.getByRole('table', { name: 'Audit events' }).locator('tbody tr td:nth-child(3)').allTextContents();
  assert.ok(actions.includes('restore') && actions.indexOf('restore') < actions.indexOf('force-unlock'), `newest first: ${actions.slice(0, 8).join(', ')}`);
  await page.getByLabel('Search').fill('force-unlock');
  await page.getByRole('table', { name: 'Audit events' }).locator('tbody tr').first().getByText('force-unlock').waitFor();
  const [file] = await Promise.all([page.waitForEvent('download'), page.getByRole('button', { name: 'Export CSV' }).click()]);
  assert.match(file.suggestedFilename(), /^carryon-audit-.*\.csv$/);
  await accessible(page, 'audit');
  await page.screenshot({ path: join(shots, 'audit.png'), fullPage: true });

  // Keyboard: Tab reaches the navigation, Enter follows a link.
  await page.getByRole('link', { name: 'Transfers' }).focus();
  await page.keyboard.press('Enter');
  await page.getByRole('heading', { level: 1, name: 'Transfers' }).waitFor();
  await page.getByRole('button', { name: 'Log out' }).click();
  await page.getByLabel('User name').waitFor();

  // A user: only the desktops they are entitled to, their state, allowed actions, restore points.
  await logIn(page, 'alice', 'alice-password');
  await page.getByRole('heading', { level: 1, name: 'My desktops' }).waitFor();
  const mine = page.getByRole('table', { name: 'My desktops' });
  await mine.locator('tr[data-desktop="win11"] td.actions').getByText('checkout').waitFor();
  assert.equal(await mine.locator('tr[data-desktop="secret"]').count(), 0, 'not entitled: not shown');
  assert.equal(await page.getByRole('link', { name: 'Policies' }).count(), 0, 'no admin pages');
  await page.getByRole('button', { name: 'Restore points of win11' }).click();
  await page.getByRole('table', { name: 'Restore points of win11' }).getByText('replica').waitFor();
  await page.getByRole('table', { name: 'Restore points of win11' }).locator('tr', { hasText: 'replica' }).getByRole('button', { name: /^Restore replica/ }).click();
  await page.getByRole('button', { name: 'Confirm restore' }).click();
  await page.getByRole('status').getByText(/your next check-out of win11 starts from the replica/).waitFor();
  await accessible(page, 'my desktops');
  await page.screenshot({ path: join(shots, 'my-desktops.png'), fullPage: true });
  await page.context().close();
});
