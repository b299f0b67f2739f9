import assert from 'node:assert/strict';
import { mkdtempSync, readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import WebSocket from 'ws';
import { displayRelay } from '../../src/broker/display/relay.js';
import { startHost, type RunningHost } from '../../src/host/service.js';
import { pinnedTlsSocket } from '../../src/net/pinned-agent.js';
import { enroll, type ClientEnv } from '../../src/client/ops.js';
import { openDisplayLink } from '../../src/cli/open-display.js';
import { request } from 'undici';
import { pinnedAgent } from '../../src/net/pinned-agent.js';
import { axe, launch, noBrowser } from '../web/browser.js';
import { ADMIN, api, cleanup, makeImage, testBroker, type Api, type TestBroker } from './harness.js';

/**
 * The display in a browser (issue 26 item 3): a browser's WebSocket, authorized by the broker
 * (session or one-time ticket), is paired with the host's outbound dial-back and relayed to the
 * guest's VNC (a QEMU started paused still greets in RFB). Refusals happen before the host hears.
 */
let broker: TestBroker;
let http: Api;
let admin: string;
let alice: string;
let bob: string;
let host: RunningHost | null = null;
const dirs: string[] = [];

before(async () => {
  broker = await testBroker();
  http = api(broker.url, broker.fingerprint);
  admin = await http.login(ADMIN.name, ADMIN.password);
  for (const u of ['alice', 'bob']) assert.equal((await http.call('POST', '/v1/admin/users', { name: u, password: `${u}-password` }, admin)).status, 201);
  for (const name of ['screen1', 'screen2']) {
    const created = await http.call('POST', '/v1/admin/desktops', { name, image: makeImage(broker.dir, 1, `${name}.raw`), config: { vcpus: 1, ramMiB: 128, minRamMiB: 128, nic: 'none' } }, admin);
    assert.equal(created.status, 201, JSON.stringify(created.body));
    assert.equal((await http.call('POST', '/v1/admin/entitlements', { principalType: 'user', principal: 'alice', targetType: 'desktop', target: name }, admin)).status, 201);
  }
  alice = await http.login('alice', 'alice-password');
  bob = await http.login('bob', 'bob-password');
  const dataDir = mkdtempSync(join(tmpdir(), 'carryon-host-'));
  dirs.push(dataDir);
  // A 5 s heartbeat: a display is answered by the host's long poll, not by its next beat.
  host = await startHost({ id: 'hd', brokerUrl: broker.url, brokerFingerprint: broker.fingerprint, secret: readFileSync(join(broker.dir, 'host.secret'), 'utf8').trim(), dataDir, vcpus: 2, ramMiB: 1024, maxDesktops: 2, accel: 'tcg', heartbeatSec: 5, pausedGuests: true });
  assert.equal((await http.call('POST', '/v1/admin/desktops/screen1/power', { action: 'on' }, admin)).status, 200);
  const id = (await broker.ctx.meta.getDesktop('screen1'))!.id;
  for (const end = Date.now() + 60_000; (await broker.ctx.hosts.placement(id))?.state !== 'running'; await new Promise((r) => setTimeout(r, 100))) {
    if (Date.now() > end) assert.fail('screen1 did not start');
  }
});
after(async () => {
  await host?.close();
  await http.close();
  await broker.close();
  cleanup(broker.dir);
  for (const d of dirs) cleanup(d);
});

const ticketFor = (desktop: string, token = alice) => http.call('POST', `/v1/desktops/${desktop}/display-ticket`, {}, token);
const displayCommands = async () => (await broker.ctx.hosts.commandsOfType('display')).length;
const events = async (action: string) => ((await http.call('GET', `/v1/admin/audit?limit=10000&action=${action}`, undefined, admin)).body.events as { actor: string; outcome: string; detail: string | null }[]);

const hostCall = async (path: string, body: unknown, withSecret: string) => {
  const agent = pinnedAgent(broker.fingerprint);
  try {
    const res = await request(`${broker.url}${path}`, { method: 'POST', dispatcher: agent, headers: { 'content-type': 'application/json', 'x-carryon-host-secret': withSecret }, body: JSON.stringify(body) });
    return { status: res.statusCode, body: (await res.body.json()) as Record<string, unknown> };
  } finally {
    await agent.close();
  }
};

async function until<T>(what: string, probe: () => Promise<T | null | undefined | false>, ms = 5000): Promise<T> {
  for (const end = Date.now() + ms; Date.now() < end; await new Promise((r) => setTimeout(r, 50))) {
    const v = await probe();
    if (v) return v;
  }
  throw new Error(`timed out waiting for ${what}`);
}

interface Opened { ws: WebSocket; first: Promise<Buffer>; closed: Promise<{ code: number; reason: string }> }
/** A browser's WebSocket to `path` (pinned TLS, as the console's origin is): its first message and its close. */
async function connect(path: string, bearer?: string): Promise<Opened | { status: number; body: Record<string, unknown> }> {
  const u = new URL(broker.url);
  const tls = await pinnedTlsSocket(u.hostname, Number(u.port), broker.fingerprint);
  const ws = new WebSocket(`wss://${u.host}${path}`, { createConnection: () => tls, perMessageDeflate: false, ...(bearer ? { headers: { authorization: `Bearer ${bearer}` } } : {}) });
  const first = new Promise<Buffer>((resolve) => ws.once('message', (d: unknown) => resolve(d as Buffer)));
  const closed = new Promise<{ code: number; reason: string }>((resolve) => ws.once('close', (code, reason) => resolve({ code, reason: reason.toString() })));
  return await new Promise((resolve, reject) => {
    ws.once('open', () => resolve({ ws, first, closed }));
    ws.once('unexpected-response', (_req, res) => {
      let text = '';
      res.on('data', (d: Buffer) => (text += d.toString()));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, body: JSON.parse(text || '{}') as Record<string, unknown> }));
    });
    ws.once('error', reject);
  });
}
const opened = (r: Awaited<ReturnType<typeof connect>>): Opened => {
  if (!('ws' in r)) assert.fail(`refused: ${r.status} ${JSON.stringify(r.body)}`);
  return r;
};

let usedTicket = '';

test('a one-time ticket opens the desktop\'s screen: the RFB greeting of the host\'s QEMU comes through the broker, and the browser\'s answer goes back; closing audits how long', async () => {
  const t = await ticketFor('screen1');
  assert.equal(t.status, 200, JSON.stringify(t.body));
  const id = (await broker.ctx.meta.getDesktop('screen1'))!.id;
  assert.match(String(t.body.url), new RegExp(`^${broker.url}/#/display/${id}\\?ticket=[A-Za-z0-9_-]{43}$`));
  usedTicket = String(t.body.socket);
  const before = await displayCommands();
  const started = process.hrtime.bigint();
  const d = opened(await connect(usedTicket));
  const greeting = await d.first;
  const latencyMs = Number(process.hrtime.bigint() - started) / 1e6;
  assert.equal(greeting.toString('latin1'), 'RFB 003.008\n');
  // Well under the host's 5 s heartbeat: its long poll brought the command.
  assert.ok(latencyMs < 2000, `connect to greeting took ${latencyMs} ms`);
  process.stdout.write(`# display: connect → RFB greeting in ${latencyMs.toFixed(0)} ms\n`);
  assert.equal(await displayCommands(), before + 1, 'one display command for the host');
  // Both ways: our version answer brings QEMU's security types (VNC without auth: one type, None).
  const security = new Promise<Buffer>((resolve) => d.ws.once('message', (m: unknown) => resolve(m as Buffer)));
  d.ws.send(Buffer.from('RFB 003.008\n'));
  assert.deepEqual([...(await security)], [1, 1]);
  const open = (await http.call('GET', '/v1/admin/displays', undefined, admin)).body.displays as { user: string; desktop: string; host: string; via: string; paired: boolean; bytesToBrowser: number }[];
  assert.deepEqual(open.map((s) => [s.user, s.desktop, s.host, s.via, s.paired]), [['alice', 'screen1', 'hd', 'ticket', true]]);
  assert.equal(host!.openDisplays(), 1);
  d.ws.close(1000);
  await d.closed;
  for (const end = Date.now() + 5000; host!.openDisplays() > 0 && Date.now() < end; ) await new Promise((r) => setTimeout(r, 50));
  assert.equal(host!.openDisplays(), 0, "the host's side closed with the browser's");
  assert.match((await events('display-open')).find((e) => e.outcome === 'ok')!.detail ?? '', /^session [0-9a-f-]+ via ticket, host hd$/);
  const closeRow = await until('display-close audited', async () => (await events('display-close'))[0]);
  assert.equal(closeRow.actor, 'alice');
  assert.match(closeRow.detail ?? '', /of alice \(via ticket, host hd\): \d+\.\d s, 14 bytes to the browser, 12 to the host; the browser closed the display/);
});

test('refused before the host hears of it (no display command queued; audited): used, expired, unknown and other-desktop tickets, another user\'s ticket or session, no session, a desktop not running', async () => {
  const before = await displayCommands();
  const id1 = (await broker.ctx.meta.getDesktop('screen1'))!.id;
  const expired = 'expired-ticket-expired-ticket-expired-ticket';
  const { createHash } = await import('node:crypto');
  await broker.ctx.hosts.addDisplayTicket({ hash: createHash('sha256').update(expired).digest('hex'), user: 'alice', desktopId: id1, expiresAt: new Date(Date.now() - 1000).toISOString() });
  const aliceTicket = async (desktop: string) => new URL(`https://x${String((await ticketFor(desktop)).body.socket)}`).searchParams.get('ticket')!;
  const id2 = (await broker.ctx.meta.getDesktop('screen2'))!.id;
  const cases: [string, string, string | undefined, number, string][] = [
    ['used ticket', usedTicket, undefined, 403, 'ticket-used'],
    ['expired ticket', `/v1/desktops/${id1}/display?ticket=${expired}`, undefined, 403, 'ticket-expired'],
    ['unknown ticket', `/v1/desktops/${id1}/display?ticket=nope`, undefined, 403, 'ticket-invalid'],
    ['another user\'s ticket', `/v1/desktops/${id1}/display?ticket=${await aliceTicket('screen1')}`, bob, 403, 'ticket-other-user'],
    ['a ticket for another desktop', `/v1/desktops/${id2}/display?ticket=${await aliceTicket('screen1')}`, undefined, 403, 'ticket-other-desktop'],
    ['another user\'s session', `/v1/desktops/${id1}/display`, bob, 403, 'not-entitled'],
    ['no session', `/v1/desktops/${id1}/display`, undefined, 401, 'unauthenticated'],
    ['a bad session', `/v1/desktops/${id1}/display`, 'forged', 401, 'unauthenticated'],
    ['a desktop not running', `/v1/desktops/${id2}/display`, alice, 409, 'not-running'],
  ];
  for (const [what, path, bearer, status, code] of cases) {
    const r = await connect(path, bearer);
    assert.ok(!('ws' in r), `${what}: opened`);
    assert.deepEqual([r.status, r.body.error], [status, code], `${what}: ${JSON.stringify(r.body)}`);
  }
  assert.equal(await displayCommands(), before, 'the host was asked nothing');
  assert.equal(host!.openDisplays(), 0);
  // Tickets: only for an entitled user, only while it runs.
  assert.deepEqual([(await ticketFor('screen1', bob)).status, (await ticketFor('screen1', bob)).body.error], [403, 'not-entitled']);
  assert.deepEqual([(await ticketFor('screen2')).status, (await ticketFor('screen2')).body.error], [409, 'not-running']);
  const denied = (await events('display-open')).filter((e) => e.outcome === 'denied').map((e) => e.detail!.split(':')[0]);
  for (const code of ['ticket-used', 'ticket-expired', 'ticket-invalid', 'ticket-other-user', 'ticket-other-desktop', 'not-entitled', 'not-running']) assert.ok(denied.includes(code), `${code} audited`);
  assert.ok((await events('display-open')).some((e) => e.actor === 'bob' && e.outcome === 'denied' && /^not-entitled/.test(e.detail ?? '')), 'bob audited by name');
});

test('the console session opens it too; an admin ends it: both sockets close (audited)', async () => {
  const id1 = (await broker.ctx.meta.getDesktop('screen1'))!.id;
  const d = opened(await connect(`/v1/desktops/${id1}/display`, alice));
  assert.equal((await d.first).toString('latin1'), 'RFB 003.008\n');
  const [s] = (await http.call('GET', '/v1/admin/displays', undefined, admin)).body.displays as { id: string; via: string }[];
  assert.equal(s!.via, 'session');
  assert.equal(host!.openDisplays(), 1);
  assert.equal((await http.call('GET', '/v1/admin/displays', undefined, alice)).status, 403, 'admins only');
  assert.deepEqual((await http.call('DELETE', `/v1/admin/displays/${s!.id}`, undefined, admin)).body, { ended: s!.id });
  assert.deepEqual(await d.closed, { code: 4001, reason: `ended by administrator ${ADMIN.name}` });
  for (const end = Date.now() + 5000; host!.openDisplays() > 0 && Date.now() < end; ) await new Promise((r) => setTimeout(r, 50));
  assert.equal(host!.openDisplays(), 0, "the host's socket closed too");
  assert.equal((await http.call('DELETE', `/v1/admin/displays/${s!.id}`, undefined, admin)).status, 404);
  await until('the admin\'s end audited', async () => (await events('display-close')).some((e) => e.actor === ADMIN.name && new RegExp(`session ${s!.id} of alice \\(via session, host hd\\).*ended by administrator`).test(e.detail ?? '')));
});

test('the host\'s dial-back: a wrong secret (401) or token (403) is refused; the right token pairs once (a second dial 409); the host closing closes the browser; a host that never dials fails the browser after the pairing timeout; a host that cannot open the screen says why (4011); a browser flooding before pairing is closed (1009)', async () => {
  // A host that only speaks the protocol (this test plays it), with screen2 placed there as running.
  const secret = readFileSync(join(broker.dir, 'host.secret'), 'utf8').trim();
  await broker.ctx.hosts.register({ id: 'mute', displayUrl: null, vcpus: 1, ramMiB: 512, maxDesktops: 1, accel: 'tcg', heartbeatSec: 60 });
  const id2 = (await broker.ctx.meta.getDesktop('screen2'))!.id;
  assert.ok(await broker.ctx.hosts.place({ desktopId: id2, hostId: 'mute', snapshotId: null, vcpus: 1, ramMiB: 128 }));
  const starting = await connect(`/v1/desktops/${id2}/display`, alice);
  assert.deepEqual(['ws' in starting, 'status' in starting && starting.status, 'body' in starting && starting.body.error], [false, 409, 'not-running'], 'placed but not running yet');
  assert.ok(await broker.ctx.hosts.transition(id2, ['starting'], 'running'));
  const relay = displayRelay(broker.ctx);
  const dial = async (session: string, headers: Record<string, string>, hostId = 'mute') => {
    const u = new URL(broker.url);
    const tls = await pinnedTlsSocket(u.hostname, Number(u.port), broker.fingerprint);
    const ws = new WebSocket(`wss://${u.host}/v1/hosts/${hostId}/display/${session}`, { createConnection: () => tls, headers });
    return await new Promise<WebSocket | number>((resolve, reject) => {
      ws.once('open', () => resolve(ws));
      ws.once('unexpected-response', (_req, res) => resolve(res.statusCode ?? 0));
      ws.once('error', reject);
    });
  };
  try {
    const d = opened(await connect(`/v1/desktops/${id2}/display`, alice));
    const commands = async () => (await hostCall('/v1/hosts/mute/commands/wait', { known: [], waitMs: 0 }, secret)).body.commands as { id: string; type: string; token?: string }[];
    const [c] = await commands();
    assert.equal(c!.type, 'display');
    assert.match(c!.token ?? '', /^[A-Za-z0-9_-]{43}$/);
    assert.equal(await dial(c!.id, { 'x-carryon-host-secret': 'wrong', 'x-carryon-display-token': c!.token! }), 401);
    assert.equal(await dial(c!.id, { 'x-carryon-host-secret': secret, 'x-carryon-display-token': 'x'.repeat(43) }), 403);
    assert.equal(await dial(c!.id, { 'x-carryon-host-secret': secret, 'x-carryon-display-token': c!.token! }, 'hd'), 403, "another host's dial");
    const h = await dial(c!.id, { 'x-carryon-host-secret': secret, 'x-carryon-display-token': c!.token! });
    assert.ok(h instanceof WebSocket);
    assert.equal(await dial(c!.id, { 'x-carryon-host-secret': secret, 'x-carryon-display-token': c!.token! }), 409, 'once');
    assert.deepEqual(await commands(), [], 'a paired display is not handed out again');
    h.send(Buffer.from('RFB 003.008\n'));
    assert.equal((await d.first).toString('latin1'), 'RFB 003.008\n');
    h.close(1000);
    assert.equal((await d.closed).code, 4010, 'the host closing closes the browser');
    assert.ok((await events('host-display')).some((e) => e.actor === 'host:mute' && e.outcome === 'denied'), 'refused dials audited');

    relay.pairingTimeoutMs = 300;
    const late = opened(await connect(`/v1/desktops/${id2}/display`, alice));
    assert.deepEqual(await late.closed, { code: 4008, reason: 'the desktop host did not connect within 0.3 s' });
    // The browser is told first; the command's failure and the audit row follow.
    await until('the late display failed and audited', async () => (await broker.ctx.hosts.commandsOfType('display')).some((x) => x.hostId === 'mute' && x.state === 'failed' && x.result === 'the desktop host did not connect within 0.3 s')
      && (await events('display-close')).some((e) => e.outcome === 'failed' && /did not connect within 0\.3 s/.test(e.detail ?? '')));
    relay.pairingTimeoutMs = 10_000;

    // The host says it cannot open the screen: the browser is told why.
    const refusedByHost = opened(await connect(`/v1/desktops/${id2}/display`, alice));
    const [c2] = await commands();
    assert.equal((await hostCall(`/v1/hosts/mute/commands/${c2!.id}`, { ok: false, message: 'the desktop is not running on this host' }, secret)).status, 200);
    assert.deepEqual(await refusedByHost.closed, { code: 4011, reason: 'the desktop host could not open the screen: the desktop is not running on this host' });
    // A browser that sends more than 64 KiB before its host is there.
    const flood = opened(await connect(`/v1/desktops/${id2}/display`, alice));
    flood.ws.send(Buffer.alloc(65 * 1024));
    assert.deepEqual(await flood.closed, { code: 1009, reason: 'too much sent before the desktop host connected' });
  } finally {
    relay.pairingTimeoutMs = 10_000;
    await broker.ctx.hosts.unplace(id2, ['running']);
  }
});

test('in a browser: Open on My desktops shows the screen (noVNC over the broker, under the console\'s CSP), Ctrl-Alt-Del is offered, axe finds nothing; a `carryon open` link works once', { skip: noBrowser }, async () => {
  const browser = await launch();
  try {
    // The real CSP (no bypass): noVNC's WebSocket and canvas must work under it.
    const strict = await browser.newContext({ ignoreHTTPSErrors: true, viewport: { width: 1280, height: 800 } });
    const page = await strict.newPage();
    page.setDefaultTimeout(20_000);
    await page.goto(broker.url);
    await page.getByLabel('User name').fill('alice');
    await page.getByLabel('Password').fill('alice-password');
    await page.getByRole('button', { name: 'Log in' }).click();
    await page.getByRole('button', { name: 'Open the screen of screen1' }).click();
    await page.getByRole('status').filter({ hasText: 'Connected' }).waitFor();
    const canvas = page.locator('.display-screen canvas');
    assert.ok(((await canvas.boundingBox())?.width ?? 0) > 0, 'the guest screen is scaled into the page');
    // QEMU's own screen of a paused guest ("Guest has not initialized the display (yet).") arrives as pixels.
    await page.waitForFunction(() => {
      const c = document.querySelector('.display-screen canvas') as HTMLCanvasElement | null;
      const d = c?.getContext('2d')?.getImageData(0, 0, c.width, c.height).data;
      let lit = 0;
      for (let i = 0; d && i < d.length; i += 4) if (d[i]! + d[i + 1]! + d[i + 2]! > 300) lit++;
      return lit > 500;
    });
    assert.ok(await page.getByRole('button', { name: 'Send Ctrl-Alt-Del' }).isEnabled());
    assert.ok(!page.url().includes('ticket='), 'the spent ticket left the address bar');
    const open = (await http.call('GET', '/v1/admin/displays', undefined, admin)).body.displays as { user: string; via: string }[];
    assert.deepEqual(open.map((s) => [s.user, s.via]), [['alice', 'ticket']]);
    await page.getByRole('button', { name: 'Send Ctrl-Alt-Del' }).click();
    await strict.close();

    // A `carryon open` link, in a fresh browser (no console login): works once; axe on the page.
    const link = String((await ticketFor('screen1')).body.url);
    const relaxed = await browser.newContext({ ignoreHTTPSErrors: true, bypassCSP: true, viewport: { width: 1280, height: 800 } });
    const p2 = await relaxed.newPage();
    p2.setDefaultTimeout(20_000);
    await p2.goto(link);
    await p2.getByRole('status').filter({ hasText: 'Connected' }).waitFor();
    const v = await axe(p2);
    assert.deepEqual(v, [], `axe on the display page: ${JSON.stringify(v, null, 1)}`);
    const p3 = await relaxed.newPage();
    await p3.goto(link);
    await p3.getByRole('status').filter({ hasText: 'could not be opened' }).waitFor();
    await relaxed.close();
  } finally {
    await browser.close();
  }
});

test('`carryon open` (from an enrolled laptop) prints a one-time link: its ticket opens the screen once', async () => {
  const home = mkdtempSync(join(tmpdir(), 'carryon-home-'));
  dirs.push(home);
  const env: ClientEnv = { home, user: 'alice', password: async () => 'alice-password', log: () => undefined, pollMs: 50 };
  await enroll(env, broker.url, { fingerprint: broker.fingerprint, name: 'alice-laptop' });
  const link = await openDisplayLink(env, 'screen1');
  const id1 = (await broker.ctx.meta.getDesktop('screen1'))!.id;
  const m = new RegExp(`^${broker.url}/#/display/${id1}\\?ticket=([A-Za-z0-9_-]{43})$`).exec(link.url);
  assert.ok(m, link.url);
  const d = opened(await connect(`/v1/desktops/${id1}/display?ticket=${m[1]}`));
  assert.equal((await d.first).toString('latin1'), 'RFB 003.008\n');
  d.ws.close(1000);
  await d.closed;
  const again = await connect(`/v1/desktops/${id1}/display?ticket=${m[1]}`);
  assert.deepEqual(['status' in again && again.status, 'body' in again && again.body.error], [403, 'ticket-used']);
});
