import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { publicKeyToBase64, generateSigningKey } from '../../src/core/signing.js';
import { ADMIN, api, cleanup, makeImage, testBroker, type Api } from './harness.js';
import type { RunningBroker } from '../../src/broker/start.js';

let broker: RunningBroker & { dir: string };
let http: Api;
let adminToken: string;
let aliceToken: string;
let bobToken: string;
let desktopId: string;
let aliceDevice: string;
const host = { cpus: 8, ramBytes: 16 * 2 ** 30, freeDiskBytes: 100 * 2 ** 30 };

before(async () => {
  broker = await testBroker();
  http = api(broker.url, broker.fingerprint);
  adminToken = await http.login(ADMIN.name, ADMIN.password);
  for (const name of ['alice', 'bob']) assert.equal((await http.call('POST', '/v1/admin/users', { name, password: `${name}-password` }, adminToken)).status, 201);
  const image = makeImage(broker.dir, 4);
  const created = await http.call('POST', '/v1/admin/desktops', { name: 'win11', image, config: { vcpus: 4, ramMiB: 4096, minRamMiB: 1024 } }, adminToken);
  assert.equal(created.status, 201, JSON.stringify(created.body));
  desktopId = String(created.body.id);
  assert.equal((await http.call('POST', '/v1/admin/groups', { name: 'staff', members: ['alice'] }, adminToken)).status, 201);
  assert.equal((await http.call('POST', '/v1/admin/entitlements', { principalType: 'group', principal: 'staff', targetType: 'desktop', target: 'win11' }, adminToken)).status, 201);
  aliceToken = await http.login('alice', 'alice-password');
  bobToken = await http.login('bob', 'bob-password');
  const dev = await http.call('POST', '/v1/devices', { name: 'laptop', publicKey: publicKeyToBase64(generateSigningKey().publicKey), host }, aliceToken);
  assert.equal(dev.status, 201);
  aliceDevice = String(dev.body.deviceId);
});
after(async () => {
  await http.close();
  await broker.close();
  cleanup(broker.dir);
});

const checkout = (token: string, body: unknown = { deviceId: aliceDevice, host }) => http.call('POST', `/v1/desktops/${desktopId}/checkout`, body, token);
const actions = async (token: string) => ((await http.call('GET', '/v1/desktops', undefined, token)).body.desktops as { actions: string[]; state: string }[])[0];

test('refusals: bad login, not entitled, malformed JSON, small host, no disk, policy; each audited, no state change', async () => {
  assert.equal((await http.call('POST', '/v1/auth/login', { username: 'alice', password: 'wrong' })).status, 401);
  assert.equal((await http.call('POST', '/v1/auth/login', { username: 'nobody', password: 'x' })).status, 401);
  assert.equal((await http.call('GET', '/v1/desktops')).status, 401);
  assert.equal((await http.call('GET', '/v1/admin/users', undefined, aliceToken)).status, 403);
  const bad = await http.call('POST', `/v1/desktops/${desktopId}/checkout`, '{"deviceId": ', aliceToken);
  assert.deepEqual([bad.status, bad.body.error], [400, 'malformed-json']);
  assert.equal((await checkout(aliceToken, { deviceId: aliceDevice })).status, 400);
  const bobDev = await http.call('POST', '/v1/devices', { name: 'b', publicKey: publicKeyToBase64(generateSigningKey().publicKey), host }, bobToken);
  const notEntitled = await checkout(bobToken, { deviceId: bobDev.body.deviceId, host });
  assert.deepEqual([notEntitled.status, notEntitled.body.error], [403, 'not-entitled']);
  const foreignDevice = await checkout(aliceToken, { deviceId: bobDev.body.deviceId, host });
  assert.deepEqual([foreignDevice.status, foreignDevice.body.error], [403, 'device-not-enrolled']);
  const small = await checkout(aliceToken, { deviceId: aliceDevice, host: { ...host, ramBytes: 512 * 2 ** 20 } });
  assert.deepEqual([small.status, small.body.error], [422, 'host-too-small']);
  const noDisk = await checkout(aliceToken, { deviceId: aliceDevice, host: { ...host, freeDiskBytes: 1000 } });
  assert.deepEqual([noDisk.status, noDisk.body.error], [422, 'not-enough-disk']);
  assert.equal((await http.call('PUT', '/v1/admin/policies/desktop/win11', { checkoutAllowed: false }, adminToken)).status, 200);
  const denied = await checkout(aliceToken);
  assert.deepEqual([denied.status, denied.body.error], [403, 'policy-denied']);
  assert.match(String(denied.body.message), /^policy \(desktop win11\) forbids check-out/, 'the layer named by its name, not its ID');
  assert.deepEqual((await actions(aliceToken))!.actions, []);
  assert.equal((await http.call('PUT', '/v1/admin/policies/desktop/win11', {}, adminToken)).status, 200);
  assert.deepEqual((await actions(aliceToken))!.actions, ['checkout']);
  const oversize = await http.call('POST', '/v1/auth/login', JSON.stringify({ username: 'a', password: 'x'.repeat(40 * 1024 * 1024) }));
  assert.equal(oversize.status, 413);
  const events = (await http.call('GET', '/v1/admin/events?limit=1000', undefined, adminToken)).body.events as { actor: string; action: string; outcome: string; detail: string | null }[];
  for (const a of ['login', 'checkout']) assert.ok(events.some((e) => e.action === a && e.outcome === 'denied'), `denied ${a} audited`);
  // Malformed and oversize bodies are audited too, with who sent them when known; each refusal once.
  const refused = events.filter((e) => e.action === 'request' && e.outcome === 'denied');
  assert.ok(refused.some((e) => e.actor === 'alice' && /malformed-json/.test(e.detail ?? '')), 'malformed JSON audited with its sender');
  assert.ok(refused.some((e) => e.actor.startsWith('anonymous@') && /413 too-large/.test(e.detail ?? '')), 'oversize body audited');
  assert.equal(events.filter((e) => e.action === 'login' && e.actor === 'alice' && e.outcome === 'denied').length, 1, 'a denied login is audited once');
  assert.equal((await broker.ctx.meta.listCheckouts()).length, 0);
});

test('two concurrent check-outs: exactly one wins; cancel unlocks; restart keeps the lock', async () => {
  const [a, b] = await Promise.all([checkout(aliceToken), checkout(aliceToken)]);
  // Same user, same device: the loser is refused while the winner sets up, or gets the winner's
  // checkout back (resume); never a second checkout.
  const statuses = [a.status, b.status].sort().join(',');
  assert.ok(statuses === '201,409' || statuses === '201,201', statuses);
  assert.equal((await broker.ctx.meta.listCheckouts({ activeOnly: true })).length, 1);
  const win = (a.status === 201 ? a : b).body as { checkout: { id: string; state: string }; job: { state: string; transfer?: unknown }; lease: unknown; keys: string; config: { vcpus: number; ramMiB: number } };
  assert.equal(win.checkout.state, 'transferring');
  assert.equal(win.job.state, 'active');
  assert.ok(win.job.transfer && win.lease && win.keys);
  assert.deepEqual([win.config.vcpus, win.config.ramMiB], [4, 4096]);
  assert.deepEqual((await actions(aliceToken))!.actions, ['cancel']);
  assert.deepEqual((await actions(adminToken))?.actions ?? [], []);

  // Broker restart mid-check-out: state and lock survive.
  await http.close();
  await broker.close();
  broker = await testBroker(broker.dir);
  http = api(broker.url, broker.fingerprint);
  aliceToken = await http.login('alice', 'alice-password');
  // The device that began it gets it back (a client killed before saving its state resumes) …
  const again = await checkout(aliceToken);
  assert.equal(again.status, 201);
  assert.equal((again.body.checkout as { id: string }).id, win.checkout.id);
  // … any other device of the same user is refused.
  const other = await http.call('POST', '/v1/devices', { name: 'laptop2', publicKey: publicKeyToBase64(generateSigningKey().publicKey), host }, aliceToken);
  const fromOther = await checkout(aliceToken, { deviceId: other.body.deviceId, host });
  assert.deepEqual([fromOther.status, fromOther.body.error], [409, 'already-checked-out']);
  const power = await http.call('POST', `/v1/admin/desktops/${desktopId}/power`, { action: 'on' }, await http.login(ADMIN.name, ADMIN.password));
  assert.deepEqual([power.status, power.body.error], [409, 'locked']);
  const c = await http.call('POST', `/v1/checkouts/${win.checkout.id}/cancel`, {}, aliceToken);
  assert.equal((c.body.checkout as { state: string }).state, 'cancelled');
  assert.equal((await http.call('POST', `/v1/checkouts/${win.checkout.id}/cancel`, {}, aliceToken)).status, 409);
});

test('check-out → transferred → replicate → check-in (missing chunks refused) → unlock; rollback policy-gated', async () => {
  adminToken = await http.login(ADMIN.name, ADMIN.password);
  bobToken = await http.login('bob', 'bob-password');
  const co = await checkout(aliceToken);
  assert.equal(co.status, 201);
  const body = co.body as { checkout: { id: string }; disks: { name: string; manifest: string }[] };
  const id = body.checkout.id;
  assert.equal((await http.call('POST', `/v1/checkouts/${id}/checkin`, { disks: body.disks }, aliceToken)).status, 409, 'not yet checked out');
  assert.equal((await http.call('POST', `/v1/checkouts/${id}/transferred`, {}, bobToken)).status, 403);
  assert.equal((await http.call('POST', `/v1/checkouts/${id}/transferred`, {}, aliceToken)).status, 200);
  assert.deepEqual((await actions(aliceToken))!.actions, ['checkin', 'replicate', 'rollback']);

  const rep = await http.call('POST', `/v1/checkouts/${id}/replicate`, { disks: body.disks }, aliceToken);
  assert.equal(rep.status, 200, JSON.stringify(rep.body));
  const repc = await http.call('POST', `/v1/checkouts/${id}/replicate/commit`, {}, aliceToken);
  assert.equal(repc.status, 200);
  assert.equal((repc.body.checkout as { state: string }).state, 'checked_out');

  // A manifest naming a chunk the server does not have cannot be committed.
  const { decodeManifest, encodeManifest } = await import('../../src/core/manifest.js');
  const m = decodeManifest(Buffer.from(body.disks[0]!.manifest, 'base64'));
  m.chunks[0] = 'f'.repeat(64);
  const bogus = [{ name: 'disk0', manifest: encodeManifest(m).toString('base64') }];
  assert.equal((await http.call('POST', `/v1/checkouts/${id}/checkin`, { disks: bogus }, aliceToken)).status, 200);
  const refused = await http.call('POST', `/v1/checkouts/${id}/checkin/commit`, {}, aliceToken);
  assert.deepEqual([refused.status, refused.body.error, (refused.body.missing as string[]).length], [409, 'missing-chunks', 1]);
  const garbage = await http.call('POST', `/v1/checkouts/${id}/checkin`, { disks: [{ name: 'disk0', manifest: 'AAAA' }] }, aliceToken);
  assert.deepEqual([garbage.status, garbage.body.error], [400, 'bad-manifest']);

  // Changes apply only to an upload begun without manifests (the bogus one above was begun with them).
  const mixed = await http.call('POST', `/v1/checkouts/${id}/checkin/commit`, { disks: [{ name: 'disk0', changes: [[1, m.chunks[1]]] }] }, aliceToken);
  assert.deepEqual([mixed.status, mixed.body.error], [400, 'bad-changes']);
  // Begun without manifests, the commit carries the changes (chunk index → ID the transfer server named).
  assert.equal((await http.call('POST', `/v1/checkouts/${id}/checkin`, {}, aliceToken)).status, 200);
  const commitWith = (disks: unknown) => http.call('POST', `/v1/checkouts/${id}/checkin/commit`, { disks }, aliceToken);
  const original = decodeManifest(Buffer.from(body.disks[0]!.manifest, 'base64'));
  const [a, b] = [original.chunks[0]!, original.chunks[1]!];
  for (const [bad, code] of [
    [[{ name: 'disk0', changes: [[original.chunks.length, a]] }], 'bad-changes'],
    [[{ name: 'disk0', changes: [[0, a], [0, b]] }], 'bad-changes'],
    [[{ name: 'disk9', changes: [[0, a]] }], 'bad-changes'],
    [[{ name: 'disk0', changes: [[0, a]] }, { name: 'disk0', changes: [[1, b]] }], 'bad-changes'],
    [[{ name: 'disk0', changes: [[-1, a]] }], 'invalid'],
    [[{ name: 'disk0', changes: [[0, 'not-an-id']] }], 'invalid'],
  ] as const) {
    const r = await commitWith(bad);
    assert.deepEqual([r.status, r.body.error], [400, code], JSON.stringify(bad));
  }
  const unknown = await commitWith([{ name: 'disk0', changes: [[0, 'f'.repeat(64)]] }]);
  assert.deepEqual([unknown.status, unknown.body.error], [409, 'missing-chunks']);
  const done = await commitWith([{ name: 'disk0', changes: [[0, b], [1, a], [2, null]] }]);
  assert.equal(done.status, 200, JSON.stringify(done.body));
  const made = (await broker.ctx.meta.getSnapshot(done.body.snapshotId as string))!;
  const committed = decodeManifest((await broker.ctx.store.getManifest(made.disks[0]!.digest))!);
  assert.deepEqual(committed.chunks, [b, a, null, ...original.chunks.slice(3)]);
  assert.equal((done.body.checkout as { state: string }).state, 'checked_in');
  assert.deepEqual((await actions(aliceToken))!.actions, ['checkout']);

  // Rollback: forbidden by user policy, then allowed; force-unlock by admin.
  const co2 = await checkout(aliceToken);
  const id2 = (co2.body.checkout as { id: string }).id;
  await http.call('POST', `/v1/checkouts/${id2}/transferred`, {}, aliceToken);
  await http.call('PUT', '/v1/admin/policies/user/alice', { rollbackAllowed: false }, adminToken);
  assert.equal((await http.call('POST', `/v1/checkouts/${id2}/rollback`, {}, aliceToken)).status, 403);
  await http.call('PUT', '/v1/admin/policies/user/alice', {}, adminToken);
  assert.equal(((await http.call('POST', `/v1/checkouts/${id2}/rollback`, {}, aliceToken)).body.checkout as { state: string }).state, 'rolled_back');
  const co3 = await checkout(aliceToken);
  const fu = await http.call('POST', `/v1/admin/checkouts/${(co3.body.checkout as { id: string }).id}/force-unlock`, {}, adminToken);
  assert.equal(fu.status, 200);
  const resolved = await http.call('GET', '/v1/admin/policies/resolve?user=alice&desktop=win11', undefined, adminToken);
  assert.deepEqual((resolved.body.policy as Record<string, unknown>).checkoutAllowed, { value: true, source: 'default' });
  const events = (await http.call('GET', '/v1/admin/events?limit=10000', undefined, adminToken)).body.events as { action: string }[];
  for (const a of ['validate', 'lock', 'snapshot', 'transfer-start', 'transfer-end', 'unlock', 'force-unlock']) assert.ok(events.some((e) => e.action === a), `event ${a}`);
});
