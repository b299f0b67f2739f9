import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { request } from 'undici';
import type { RunningBroker } from '../../src/broker/start.js';
import { issueToken } from '../../src/broker/auth/tokens.js';
import { pinnedAgent } from '../../src/net/pinned-agent.js';
import { endFrame } from '../../src/core/chunks/frames.js';
import { ADMIN, api, cleanup, makeImage, testBroker, type Api } from './harness.js';
import { enrolDevice, HEARTBEAT, HOST, type TestDevice } from './trust-helpers.js';

let broker: RunningBroker & { dir: string };
let http: Api;
let admin: string;
let alice: string;
let bob: string;
let carol: string;
let desktopId: string;
let aliceEntitlement: string;
let dev: TestDevice;

type Job = { id: string; kind: string; state: string; transfer?: { url: string; ticket: string; fingerprint: string } };
type Co = { checkout: { id: string; state: string; jobId?: string }; job: Job; disks: { name: string; manifest: string }[]; lease: unknown; keys: string; config: unknown };

before(async () => {
  broker = await testBroker();
  http = api(broker.url, broker.fingerprint);
  admin = await http.login(ADMIN.name, ADMIN.password);
  for (const name of ['alice', 'bob', 'carol']) assert.equal((await http.call('POST', '/v1/admin/users', { name, password: `${name}-password` }, admin)).status, 201);
  const created = await http.call('POST', '/v1/admin/desktops', { name: 'win11', image: makeImage(broker.dir, 2), config: { vcpus: 2, ramMiB: 1024, minRamMiB: 256 } }, admin);
  desktopId = String(created.body.id);
  aliceEntitlement = String((await http.call('POST', '/v1/admin/entitlements', { principalType: 'user', principal: 'alice', targetType: 'desktop', target: 'win11' }, admin)).body.id);
  await http.call('POST', '/v1/admin/groups', { name: 'staff', members: ['carol'] }, admin);
  await http.call('POST', '/v1/admin/entitlements', { principalType: 'group', principal: 'staff', targetType: 'desktop', target: 'win11' }, admin);
  [alice, bob, carol] = await Promise.all(['alice', 'bob', 'carol'].map((u) => http.login(u, `${u}-password`)));
  dev = await enrolDevice(http, broker.url, broker.fingerprint, alice);
});
after(async () => {
  await http.close();
  await broker.close();
  cleanup(broker.dir);
});

const checkout = async (token = alice, deviceId = dev.id) => http.call('POST', `/v1/desktops/${desktopId}/checkout`, { deviceId, host: HOST }, token);
const events = async () => (await http.call('GET', '/v1/admin/events?limit=10000', undefined, admin)).body.events as { actor: string; action: string; outcome: string; detail: string | null }[];

/** Asks the job's transfer server with its ticket, moving nothing (an empty push or fetch): 200 while valid. */
async function ticketWorks(job: Job): Promise<{ status: number; error?: string }> {
  const agent = pinnedAgent(job.transfer!.fingerprint);
  try {
    const [path, type, body] = job.kind === 'checkout' ? ['fetch', 'application/json', '{"ids":[]}'] : ['push', 'application/octet-stream', endFrame()];
    const res = await request(`${job.transfer!.url}/v1/chunks/${path}`, { method: 'POST', dispatcher: agent, headers: { authorization: `Ticket ${job.transfer!.ticket}`, 'content-type': type }, body });
    const bytes = Buffer.from(await res.body.arrayBuffer());
    return { status: res.statusCode, error: res.statusCode === 200 ? undefined : (JSON.parse(bytes.toString()) as { error?: string }).error };
  } finally {
    await agent.close();
  }
}

test('item 2: only the holder (or an admin, without a ticket) sees or touches a job; other views carry no job IDs; audited', async () => {
  const co = await checkout();
  assert.equal(co.status, 201);
  const { job, checkout: c } = co.body as Co;
  assert.ok(job.transfer);
  for (const path of [`/v1/jobs/${job.id}`]) {
    const r = await http.call('GET', path, undefined, bob);
    assert.deepEqual([r.status, r.body.error, r.body.transfer], [404, 'not-found', undefined]);
  }
  for (const op of ['pause', 'resume']) assert.equal((await http.call('POST', `/v1/jobs/${job.id}/${op}`, {}, bob)).status, 404);
  // The job scope answers before the body is read: bob's malformed progress report is 404, not 400.
  assert.equal((await http.call('POST', `/v1/jobs/${job.id}/progress`, { bytesLocal: 'x' }, bob)).status, 404);
  assert.equal((await http.call('POST', `/v1/jobs/${job.id}/progress`, { bytesLocal: 'x' }, admin)).status, 403);
  assert.equal((await http.call('GET', `/v1/jobs/${job.id}`, undefined, carol)).status, 404);
  const asAdmin = await http.call('GET', `/v1/jobs/${job.id}`, undefined, admin);
  assert.deepEqual([asAdmin.status, asAdmin.body.state, asAdmin.body.transfer], [200, 'active', undefined], 'admin sees the job, not its ticket');
  // Carol is entitled to the desktop: she sees that alice holds it, but no job or device ID.
  const list = (await http.call('GET', '/v1/desktops', undefined, carol)).body.desktops as { checkout?: Record<string, unknown> }[];
  assert.equal(list[0]!.checkout!.user, 'alice');
  assert.equal(list[0]!.checkout!.jobId, undefined);
  assert.equal(list[0]!.checkout!.deviceId, undefined);
  assert.ok(!JSON.stringify(list).includes(job.id));
  // The holder: pause and resume, ticket renewed; all audited.
  assert.equal(((await http.call('POST', `/v1/jobs/${job.id}/pause`, {}, alice)).body as Job).state, 'paused');
  assert.equal(((await http.call('POST', `/v1/jobs/${job.id}/resume`, {}, alice)).body as Job).state, 'active');
  assert.ok(((await http.call('GET', `/v1/jobs/${job.id}`, undefined, alice)).body as Job).transfer);
  const ev = await events();
  assert.ok(ev.some((e) => e.actor === 'bob' && e.action === 'job-view' && e.outcome === 'denied'));
  assert.ok(ev.some((e) => e.actor === 'bob' && e.action === 'transfer-pause' && e.outcome === 'denied'));
  assert.ok(ev.some((e) => e.actor === 'alice' && e.action === 'transfer-pause' && e.outcome === 'ok'));
  assert.ok(ev.filter((e) => e.actor === 'alice' && e.action === 'ticket-issue').length >= 2, 'issue and renewal audited');
  assert.equal((await http.call('POST', `/v1/checkouts/${c.id}/cancel`, {}, alice)).status, 200);
});

test('item 9: the device that began a check-out gets it again (same 201 answer), can cancel it, and its tickets die at once', async () => {
  const first = (await checkout()).body as Co;
  assert.equal((await ticketWorks(first.job)).status, 200);
  const again = await checkout();
  assert.equal(again.status, 201);
  const body = again.body as Co;
  assert.equal(body.checkout.id, first.checkout.id);
  assert.equal(body.job.id, first.job.id);
  assert.ok(body.job.transfer && body.lease && body.keys && body.config && body.disks.length === 1);
  assert.deepEqual(body.disks, first.disks);
  // Its job ended meanwhile (e.g. failed): resuming gives a fresh one.
  await broker.ctx.scheduler.finish(first.job.id, 'failed');
  const third = (await checkout()).body as Co;
  assert.equal(third.checkout.id, first.checkout.id);
  assert.notEqual(third.job.id, first.job.id);
  assert.equal((await ticketWorks(third.job)).status, 200);
  // Another user is still refused.
  const bobDev = await enrolDevice(http, broker.url, broker.fingerprint, bob, 'bobs');
  assert.equal((await checkout(bob, bobDev.id)).status, 403);
  const cancelled = await http.call('POST', `/v1/checkouts/${first.checkout.id}/cancel`, {}, alice);
  assert.equal((cancelled.body.checkout as { state: string }).state, 'cancelled');
  // The cancelled checkout's ticket is refused by the transfer server now, not at its expiry.
  assert.deepEqual(await ticketWorks(third.job), { status: 403, error: 'ticket-revoked' });
  assert.ok((await events()).some((e) => e.action === 'checkout-resume' && e.actor === 'alice'));
});

test('item 3: requireOnlineReauth: check-in and rollback need a recent password login on the checkout\'s device', async () => {
  const co = (await checkout()).body as Co;
  assert.equal((await http.call('POST', `/v1/checkouts/${co.checkout.id}/transferred`, {}, alice)).status, 200);
  const now = Math.floor(Date.now() / 1000);
  const stale = issueToken(broker.ctx.secrets.tokenKey, { sub: 'alice', role: 'user', exp: now + 3600, iat: now - 3 * 3600 });
  const elsewhere = issueToken(broker.ctx.secrets.tokenKey, { sub: 'alice', role: 'user', exp: now + 3600, iat: now, dev: 'another-device' });
  for (const token of [stale, elsewhere]) {
    for (const [path, body] of [['checkin', {}], ['replicate', {}], ['rollback', {}]] as const) {
      const r = await http.call('POST', `/v1/checkouts/${co.checkout.id}/${path}`, body, token);
      assert.deepEqual([r.status, r.body.error], [403, 'reauth-required'], `${path}: ${JSON.stringify(r.body)}`);
    }
  }
  // With the policy off, the same stale session may; a fresh login always may.
  await http.call('PUT', '/v1/admin/policies/user/alice', { requireOnlineReauth: false }, admin);
  assert.equal((await http.call('POST', `/v1/checkouts/${co.checkout.id}/replicate`, {}, stale)).status, 200);
  await http.call('PUT', '/v1/admin/policies/user/alice', {}, admin);
  alice = await http.login('alice', 'alice-password', dev.id);
  assert.equal((await http.call('POST', `/v1/checkouts/${co.checkout.id}/replicate`, {}, alice)).status, 200);
});

test('item 3: disable, un-entitle and revoke cut off leases (agent too), tickets and logins at once, and lock at the next heartbeat', async () => {
  const held = (await broker.ctx.meta.activeCheckout(desktopId))!;
  assert.equal(held.state, 'checked_out');
  const lease = async () => dev.post('/v1/agent/lease', {});
  const beat = async () => (await dev.post('/v1/agent/heartbeat', HEARTBEAT)).body as { commands: { id: string; type: string; desktopId?: string }[] };
  const ack = async (cmds: { id: string }[]) => { for (const c of cmds) assert.equal((await dev.post(`/v1/agent/commands/${c.id}/ack`, { ok: true })).status, 200); };
  assert.ok((await lease()).body.lease, 'a lease while all is well');
  assert.deepEqual((await beat()).commands, []);

  // (a) Disabled user: no agent lease, no login; lock at the next heartbeat.
  await http.call('PATCH', '/v1/admin/users/alice', { disabled: true }, admin);
  assert.equal((await lease()).status, 403);
  assert.equal((await http.call('POST', '/v1/auth/login', { username: 'alice', password: 'alice-password' })).status, 401);
  assert.equal((await http.call('GET', '/v1/desktops', undefined, alice)).status, 401, 'an open session stops too');
  let cmds = (await beat()).commands;
  assert.deepEqual(cmds.map((c) => [c.type, c.desktopId]), [['lock', desktopId]]);
  await ack(cmds);
  await http.call('PATCH', '/v1/admin/users/alice', { disabled: false }, admin);
  assert.ok((await lease()).body.lease, 're-enabled: leases again');
  alice = await http.login('alice', 'alice-password', dev.id);

  // (b) Entitlement removed: an upload in flight loses its ticket, no lease, lock at the heartbeat.
  const up = (await http.call('POST', `/v1/checkouts/${held.id}/checkin`, {}, alice)).body as { job: Job };
  assert.equal((await ticketWorks(up.job)).status, 200);
  assert.equal((await beat()).commands.length, 0);
  await http.call('DELETE', `/v1/admin/entitlements/${aliceEntitlement}`, undefined, admin);
  assert.deepEqual(await ticketWorks(up.job), { status: 403, error: 'ticket-revoked' });
  const j = await http.call('GET', `/v1/jobs/${up.job.id}`, undefined, alice);
  assert.deepEqual([j.status, j.body.error], [403, 'cut-off']);
  assert.equal((await lease()).body.lease, null);
  assert.equal((await http.call('POST', `/v1/checkouts/${held.id}/lease`, {}, alice)).status, 409);
  cmds = (await beat()).commands;
  assert.deepEqual(cmds.map((c) => c.type), ['lock']);
  await ack(cmds);
  aliceEntitlement = String((await http.call('POST', '/v1/admin/entitlements', { principalType: 'user', principal: 'alice', targetType: 'desktop', target: 'win11' }, admin)).body.id);
  assert.deepEqual((await beat()).commands, []);
  assert.ok((await lease()).body.lease, 're-entitled: leases again');

  // (c) Device revoked: no login on it, no lease, no check-out from it; its heartbeat still brings `lock`.
  assert.equal((await http.call('POST', `/v1/admin/devices/${dev.id}/revoke`, {}, alice)).status, 403, 'admins only');
  assert.equal((await http.call('POST', `/v1/admin/devices/${dev.id}/revoke`, {}, admin)).status, 200);
  const listed = (await http.call('GET', '/v1/admin/devices', undefined, admin)).body.devices as { id: string; revokedAt: string | null }[];
  assert.ok(listed.find((d) => d.id === dev.id)!.revokedAt, 'the admin list shows it revoked');
  const open = await http.call('GET', '/v1/desktops', undefined, alice);
  assert.deepEqual([open.status, open.body.error], [403, 'device-revoked'], 'a session opened on that device stops too');
  const login = await http.call('POST', '/v1/auth/login', { username: 'alice', password: 'alice-password', deviceId: dev.id });
  assert.deepEqual([login.status, login.body.error], [403, 'device-revoked']);
  assert.deepEqual([(await lease()).status, (await lease()).body.error], [403, 'device-revoked']);
  cmds = (await beat()).commands;
  assert.deepEqual(cmds.map((c) => c.type), ['lock']);
  await ack(cmds);
  const co = await checkout(await http.login('alice', 'alice-password'));
  assert.deepEqual([co.status, co.body.error], [403, 'device-revoked']);
  const ev = await events();
  assert.equal(ev.filter((e) => e.action === 'cut-off').length, 3);
  assert.ok(ev.some((e) => e.action === 'device-revoke' && e.actor === ADMIN.name));
  assert.ok(ev.some((e) => e.action === 'lease-renew' && e.actor === `device:${dev.id}` && e.outcome === 'ok'), 'agent lease renewal audited');
});
