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
  assert.ok(refused.some((e) => e.actor.startsWith('anonymous@') && /413 body-too-large/.test(e.detail ?? '')), 'oversize body audited');
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

test('check-out → transferred → replicate → check-in (foreign chunks refused, no oracle; missing ones of its own listed) → unlock; rollback policy-gated', async () => {
  adminToken = await http.login(ADMIN.name, ADMIN.password);
  bobToken = await http.login('bob', 'bob-password');
  const co = await checkout(aliceToken);
  assert.equal(co.status, 201);
  const body = co.body as { checkout: { id: string }; disks: { name: string; manifest: string }[] };
  const id = body.checkout.id;
  assert.equal((await http.call('POST', `/v1/checkouts/${id}/checkin`, {}, aliceToken)).status, 409, 'not yet checked out');
  assert.equal((await http.call('POST', `/v1/checkouts/${id}/transferred`, {}, bobToken)).status, 403);
  assert.equal((await http.call('POST', `/v1/checkouts/${id}/transferred`, {}, aliceToken)).status, 200);
  assert.deepEqual((await actions(aliceToken))!.actions, ['checkin', 'replicate', 'rollback']);

  const rep = await http.call('POST', `/v1/checkouts/${id}/replicate`, {}, aliceToken);
  assert.equal(rep.status, 200, JSON.stringify(rep.body));
  const repc = await http.call('POST', `/v1/checkouts/${id}/replicate/commit`, {}, aliceToken);
  assert.equal(repc.status, 200);
  assert.equal((repc.body.checkout as { state: string }).state, 'checked_out');
  // The agent's replica says so (the broker queues it behind users' jobs, its ticket has the transfer
  // server rebuild it in the idle CPU class); a check-in never is one.
  const bg = await http.call('POST', `/v1/checkouts/${id}/replicate`, { background: true }, aliceToken);
  assert.equal(bg.status, 200, JSON.stringify(bg.body));
  /** The ticket's payload (the broker signs it; the transfer server reads it). */
  const ticketOf = (job: unknown): { background?: boolean } => {
    const ticket = (job as { transfer?: { ticket: string } }).transfer?.ticket;
    assert.ok(ticket, 'the job has a slot and a ticket');
    return JSON.parse(Buffer.from(ticket.split('.')[0]!, 'base64url').toString()) as { background?: boolean };
  };
  assert.equal(ticketOf(bg.body.job).background, true);
  assert.equal(ticketOf(rep.body.job).background, undefined);
  assert.equal((await http.call('POST', `/v1/checkouts/${id}/replicate/commit`, {}, aliceToken)).status, 200);
  const startEvents = ((await http.call('GET', '/v1/admin/events?limit=1000', undefined, adminToken)).body.events as { action: string; detail: string | null }[]).filter((e) => e.action === 'transfer-start');
  assert.ok(startEvents.some((e) => e.detail?.startsWith('replicate job') && e.detail.endsWith('(background)')), 'the audit tells a background replica');
  assert.deepEqual([(await http.call('POST', `/v1/checkouts/${id}/checkin`, { background: true }, aliceToken)).status], [400]);

  // The begin carries no manifests any more (the transfer server names the chunks).
  const withManifests = await http.call('POST', `/v1/checkouts/${id}/checkin`, { disks: body.disks }, aliceToken);
  assert.deepEqual([withManifests.status, withManifests.body.error], [400, 'invalid']);
  // The commit carries the changes (chunk index → ID the transfer server named) and their push receipts.
  const { decodeManifest } = await import('../../src/core/chunks/manifest.js');
  assert.equal((await http.call('POST', `/v1/checkouts/${id}/checkin`, {}, aliceToken)).status, 200);
  // Receipts travel inline: [index, id, receipt].
  const inline = (disks: unknown, receipts?: Record<string, string>) => receipts
    ? (disks as { name: string; changes: [number, string][] }[]).map((d) => ({ ...d, changes: d.changes.map(([i, c]) => (receipts[c] ? [i, c, receipts[c]] : [i, c])) }))
    : disks;
  const commitWith = (disks: unknown, receipts?: Record<string, string>) => http.call('POST', `/v1/checkouts/${id}/checkin/commit`, { disks: inline(disks, receipts) }, aliceToken);
  const original = decodeManifest(Buffer.from(body.disks[0]!.manifest, 'base64'));
  const [a, b] = [original.chunks[0]!, original.chunks[1]!];
  for (const [bad, code] of [
    [[{ name: 'disk0', changes: [[original.chunks.length, a]] }], 'bad-changes'],
    [[{ name: 'disk0', changes: [[0, a], [0, b]] }], 'bad-changes'],
    [[{ name: 'disk9', changes: [[0, a]] }], 'bad-changes'],
    [[{ name: 'disk0', changes: [[0, a]] }, { name: 'disk0', changes: [[1, b]] }], 'bad-changes'],
    [[{ name: 'disk0', changes: [[-1, a]] }], 'invalid'],
    [[{ name: 'disk0', changes: [[0, 'not-an-id']] }], 'invalid'],
    [[{ name: 'disk0', changes: [[0, a, 'not-a-receipt']] }], 'invalid'],
    [[{ name: 'disk0', changes: [[0, a, 'A'.repeat(22), 'A'.repeat(22)]] }], 'invalid'],
  ] as const) {
    const r = await commitWith(bad);
    assert.deepEqual([r.status, r.body.error], [400, code], JSON.stringify(bad));
  }

  // Another desktop's chunk (in the store) and a chunk nobody has: refused alike, without a receipt
  // and with a forged or another check-out's one; the answer does not tell which exists.
  const { sealChunk } = await import('../../src/core/chunks/blob.js');
  const { generateLineageKeys } = await import('../../src/core/keys.js');
  const { pushReceipt, receiptKey } = await import('../../src/core/tokens/push-receipt.js');
  const theirs = sealChunk(generateLineageKeys(), Buffer.alloc(256 * 1024, 7));
  assert.equal(await broker.ctx.store.put(theirs.id, theirs.blob), true);
  const nobody = 'f'.repeat(64);
  const lineage = (await broker.ctx.meta.getDesktop(desktopId))!.lineageId;
  const receipt = (checkoutId: string, chunk: string) => pushReceipt(receiptKey(broker.ctx.secrets.masterKey), { checkoutId, keyContext: `lineage:${lineage}`, id: chunk });
  const answers: string[] = [];
  for (const chunk of [theirs.id, nobody]) {
    for (const receipts of [undefined, { [chunk]: receipt('another-checkout', chunk) }, { [chunk]: Buffer.alloc(16, 1).toString('base64url') }]) {
      const r = await commitWith([{ name: 'disk0', changes: [[0, chunk]] }], receipts);
      assert.deepEqual([r.status, r.body.error], [400, 'bad-changes'], JSON.stringify(r.body));
      answers.push(JSON.stringify(r.body).replace(chunk, 'ID'));
    }
  }
  assert.equal(new Set(answers).size, 1, `one answer whether the chunk exists or not: ${answers.join(' | ')}`);
  // With this check-out's receipt, a chunk the store lacks is listed (it pushed it: swept since).
  const unknown = await commitWith([{ name: 'disk0', changes: [[0, nobody]] }], { [nobody]: receipt(id, nobody) });
  assert.deepEqual([unknown.status, unknown.body.error, unknown.body.missing], [409, 'missing-chunks', [nobody]]);
  // The checkpoint's own chunks need no receipt, wherever they move.
  const done = await commitWith([{ name: 'disk0', changes: [[0, b], [1, a], [2, null]] }]);
  assert.equal(done.status, 200, JSON.stringify(done.body));
  const made = (await broker.ctx.meta.getSnapshot(done.body.snapshotId as string))!;
  const committed = decodeManifest((await broker.ctx.store.getManifest(made.disks[0]!.digest))!);
  assert.deepEqual(committed.chunks, [b, a, null, ...original.chunks.slice(3)]);
  assert.equal((done.body.checkout as { state: string }).state, 'checked_in');
  assert.deepEqual((await actions(aliceToken))!.actions, ['checkout']);
  // The next check-out's manifests (all its ticket lets it fetch) name neither.
  const next = (await checkout(aliceToken)).body as { checkout: { id: string }; disks: { manifest: string }[]; job: { transfer?: { url: string; fingerprint: string; ticket: string } } };
  assert.ok(!decodeManifest(Buffer.from(next.disks[0]!.manifest, 'base64')).chunks.some((c) => c === theirs.id || c === nobody));
  const { request } = await import('undici');
  const { pinnedAgent } = await import('../../src/net/pinned-agent.js');
  const { FrameDecoder, FRAME_ERROR } = await import('../../src/core/chunks/frames.js');
  const t = next.job.transfer!;
  const agent = pinnedAgent(t.fingerprint);
  const fetched = await request(`${t.url}/v1/chunks/fetch`, { method: 'POST', dispatcher: agent, headers: { authorization: `Ticket ${t.ticket}`, 'content-type': 'application/json' }, body: JSON.stringify({ ids: [theirs.id] }) });
  const frames = new FrameDecoder().push(Buffer.from(await fetched.body.arrayBuffer()));
  await agent.close();
  assert.deepEqual(frames.filter((f) => 'id' in f && f.id === theirs.id).map((f) => f.type), [FRAME_ERROR], 'its ticket does not fetch the other desktop\'s chunk');
  assert.equal((await http.call('POST', `/v1/checkouts/${next.checkout.id}/cancel`, {}, aliceToken)).status, 200);

  // Rollback: forbidden by user policy, then allowed; force-unlock by admin.
  const co2 = await checkout(aliceToken);
  const id2 = (co2.body.checkout as { id: string }).id;
  await http.call('POST', `/v1/checkouts/${id2}/transferred`, {}, aliceToken);
  await http.call('PUT', '/v1/admin/policies/user/alice', { rollbackAllowed: false }, adminToken);
  assert.equal((await http.call('POST', `/v1/checkouts/${id2}/rollback`, {}, aliceToken)).status, 403);
  await http.call('PUT', '/v1/admin/policies/user/alice', {}, adminToken);
  assert.equal(((await http.call('POST', `/v1/checkouts/${id2}/rollback`, {}, aliceToken)).body.checkout as { state: string }).state, 'rolled_back');
  const co3 = await checkout(aliceToken);
  const id3 = (co3.body.checkout as { id: string }).id;
  const early = await http.call('POST', `/v1/checkouts/${id3}/handback`, {}, aliceToken);
  assert.deepEqual([early.status, early.body.error], [409, 'wrong-state'], 'only an ended check-out is handed back');
  const fu = await http.call('POST', `/v1/admin/checkouts/${id3}/force-unlock`, {}, adminToken);
  assert.equal(fu.status, 200);

  // Hand-back after a force-unlock: the holder uploads the work as a restore point (receipts as for a check-in), never current.
  const current = (await broker.ctx.meta.getDesktop(desktopId))!.currentSnapshot;
  const outcome = await http.call('GET', `/v1/checkouts/${id3}`, undefined, aliceToken);
  assert.deepEqual([outcome.status, (outcome.body.checkout as { state: string }).state, outcome.body.committed, outcome.body.handedBack], [200, 'cancelled', null, null]);
  assert.equal((await http.call('GET', `/v1/checkouts/${id3}`, undefined, bobToken)).status, 403);
  assert.equal((await http.call('POST', `/v1/checkouts/${id3}/handback`, {}, bobToken)).status, 403);
  assert.equal((await http.call('POST', `/v1/checkouts/${id3}/handback`, {}, aliceToken)).status, 200);
  const handBack = (disks: unknown, receipts?: Record<string, string>) => http.call('POST', `/v1/checkouts/${id3}/handback/commit`, { disks: inline(disks, receipts) }, aliceToken);
  const foreign = await handBack([{ name: 'disk0', changes: [[0, theirs.id]] }], { [theirs.id]: receipt(id, theirs.id) });
  assert.deepEqual([foreign.status, foreign.body.error], [400, 'bad-changes'], 'another check-out\'s receipt does not do');
  // What the transfer server stored for this check-out (the broker checks receipts; the server checked the bytes).
  const mine = sealChunk(generateLineageKeys(), Buffer.alloc(256 * 1024, 9));
  await broker.ctx.store.put(mine.id, mine.blob);
  const handed = await handBack([{ name: 'disk0', changes: [[3, mine.id]] }], { [mine.id]: receipt(id3, mine.id) });
  assert.equal(handed.status, 200, JSON.stringify(handed.body));
  const point = (await broker.ctx.meta.getSnapshot(handed.body.snapshotId as string))!;
  assert.equal(point.kind, 'handback');
  assert.equal((await broker.ctx.meta.getDesktop(desktopId))!.currentSnapshot, current, 'not the current version');
  assert.equal(decodeManifest((await broker.ctx.store.getManifest(point.disks[0]!.digest))!).chunks[3], mine.id);
  const twice = await http.call('POST', `/v1/checkouts/${id3}/handback`, {}, aliceToken);
  assert.deepEqual([twice.status, twice.body.error, twice.body.snapshotId], [409, 'already-handed-back', point.id]);
  assert.equal(((await http.call('GET', `/v1/checkouts/${id3}`, undefined, aliceToken)).body.handedBack as { snapshotId: string }).snapshotId, point.id);
  const resolved = await http.call('GET', '/v1/admin/policies/resolve?user=alice&desktop=win11', undefined, adminToken);
  assert.deepEqual((resolved.body.policy as Record<string, unknown>).checkoutAllowed, { value: true, source: 'default' });
  const events = (await http.call('GET', '/v1/admin/events?limit=10000', undefined, adminToken)).body.events as { action: string }[];
  for (const a of ['validate', 'lock', 'snapshot', 'transfer-start', 'transfer-end', 'unlock', 'force-unlock', 'handback']) assert.ok(events.some((e) => e.action === a), `event ${a}`);
});
