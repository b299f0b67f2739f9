import assert from 'node:assert/strict';
import { readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { request } from 'undici';
import type { RunningBroker } from '../../src/broker/start.js';
import { pinnedAgent } from '../../src/net/pinned-agent.js';
import { ADMIN, api, cleanup, makeImage, testBroker, type Api } from './harness.js';

let broker: RunningBroker & { dir: string };
let http: Api;
let token: string;

before(async () => {
  broker = await testBroker();
  http = api(broker.url, broker.fingerprint);
  token = await http.login(ADMIN.name, ADMIN.password);
});
after(async () => {
  await http.close();
  await broker.close();
  cleanup(broker.dir);
});

async function waitImport(id: string): Promise<{ state: string; error: { code: string } | null }> {
  for (let i = 0; i < 400; i++) {
    const job = (await http.call('GET', `/v1/admin/imports/${id}`, undefined, token)).body.import as { state: string; error: { code: string } | null };
    if (job.state !== 'running') return job;
    await new Promise((r) => setTimeout(r, 25));
  }
  throw new Error('import did not finish');
}

test('import sanity: too small, not whole sectors, relative path and missing file are refused with a clear message', async () => {
  const tiny = join(broker.dir, 'tiny.raw');
  writeFileSync(tiny, Buffer.alloc(1000, 1));
  const odd = join(broker.dir, 'odd.raw');
  writeFileSync(odd, Buffer.alloc(256 * 1024 + 100, 1));
  for (const background of [false, true]) {
    const small = await http.call('POST', '/v1/admin/desktops', { name: 'tiny', image: tiny, background }, token);
    assert.deepEqual([small.status, small.body.error], [400, 'image-too-small']);
    assert.match(String(small.body.message), /smaller than one chunk/);
    const sectors = await http.call('POST', '/v1/admin/desktops', { name: 'odd', image: odd, background }, token);
    assert.deepEqual([sectors.status, sectors.body.error], [400, 'not-whole-sectors']);
    const rel = await http.call('POST', '/v1/admin/desktops', { name: 'rel', image: 'images/win.raw', background }, token);
    assert.deepEqual([rel.status, rel.body.error], [400, 'relative-path']);
    assert.match(String(rel.body.message), /on the broker host/);
    const missing = await http.call('POST', '/v1/admin/desktops', { name: 'gone', image: join(broker.dir, 'nope.raw'), background }, token);
    assert.equal(missing.status, 404);
    assert.match(String(missing.body.message), /broker host.*upload/);
  }
  assert.equal((await http.call('GET', '/v1/admin/desktops', undefined, token)).body.desktops instanceof Array, true);
  assert.equal(((await http.call('GET', '/v1/admin/desktops', undefined, token)).body.desktops as unknown[]).length, 0);
});

test('upload from the admin machine: streamed in pieces, resumed at the broker offset, imported, then removed', async () => {
  const image = readFileSync(makeImage(broker.dir, 2, 'up.raw'));
  const agent = pinnedAgent(broker.fingerprint);
  const put = async (id: string, offset: number, body: Buffer) => {
    const r = await request(`${broker.url}/v1/admin/uploads/${id}?offset=${offset}`, { method: 'PUT', dispatcher: agent, headers: { 'content-type': 'application/octet-stream', authorization: `Bearer ${token}` }, body });
    return { status: r.statusCode, body: (await r.body.json()) as Record<string, unknown> };
  };
  try {
    const tooSmall = await http.call('POST', '/v1/admin/uploads', { name: 'x.raw', sizeBytes: 1000 }, token);
    assert.equal(tooSmall.body.error, 'image-too-small');
    const up = await http.call('POST', '/v1/admin/uploads', { name: 'up.raw', sizeBytes: image.length }, token);
    assert.equal(up.status, 201);
    const id = String(up.body.id);
    assert.equal((await put(id, 0, image.subarray(0, 700_000))).body.received, 700_000);
    const wrong = await put(id, 0, image.subarray(0, 10));
    assert.deepEqual([wrong.status, wrong.body.error, wrong.body.received], [409, 'offset-mismatch', 700_000]);
    const early = await http.call('POST', `/v1/admin/uploads/${id}/import`, { name: 'uploaded' }, token);
    assert.deepEqual([early.status, early.body.error], [409, 'incomplete']);
    const long = await put(id, 700_000, Buffer.concat([image.subarray(700_000), Buffer.alloc(10)]));
    assert.deepEqual([long.status, long.body.error], [400, 'too-long']);
    // The refused piece may have left a prefix: resume from what the broker says it has.
    const have = Number((await http.call('GET', `/v1/admin/uploads/${id}`, undefined, token)).body.received);
    const done = await put(id, have, image.subarray(have));
    assert.equal(done.body.complete, true);
    const started = await http.call('POST', `/v1/admin/uploads/${id}/import`, { name: 'uploaded' }, token);
    assert.equal(started.status, 202);
    assert.equal((await waitImport(String((started.body.import as { id: string }).id))).state, 'done');
    assert.equal((await http.call('GET', '/v1/admin/desktops/uploaded', undefined, token)).status, 200);
    for (let i = 0; i < 200 && readdirSync(join(broker.dir, 'uploads')).length > 0; i++) await new Promise((r) => setTimeout(r, 20));
    assert.deepEqual(readdirSync(join(broker.dir, 'uploads')), [], 'upload removed after import');
  } finally {
    await agent.close();
  }
});

test('restore points: listed newest first; admin restores; a user only where policy allows and when entitled', async () => {
  const image = makeImage(broker.dir, 2, 'rp.raw');
  assert.equal((await http.call('POST', '/v1/admin/desktops', { name: 'rp', image }, token)).status, 201);
  assert.equal((await http.call('POST', '/v1/admin/desktops', { name: 'other', cloneOf: 'rp' }, token)).status, 201);
  await http.call('POST', '/v1/admin/users', { name: 'dora', password: 'dora-password' }, token);
  await http.call('POST', '/v1/admin/entitlements', { principalType: 'user', principal: 'dora', targetType: 'desktop', target: 'rp' }, token);
  const dora = await http.login('dora', 'dora-password');
  const first = await http.call('GET', '/v1/desktops/rp/restore-points', undefined, token);
  const points = first.body.restorePoints as { id: string; kind: string; current: boolean }[];
  assert.deepEqual(points.map((p) => [p.kind, p.current]), [['import', true]]);
  // Admin restore of the (only) point: a new "restore" snapshot becomes current.
  const r = await http.call('POST', '/v1/desktops/rp/restore', { snapshotId: points[0]!.id, reason: 'test' }, token);
  assert.equal(r.status, 200, JSON.stringify(r.body));
  const after = (await http.call('GET', '/v1/desktops/rp/restore-points', undefined, token)).body.restorePoints as { id: string; kind: string; current: boolean }[];
  assert.deepEqual(after.map((p) => [p.kind, p.current]), [['restore', true], ['import', false]]);
  // User: refused by policy (default), then allowed; never for a desktop she is not entitled to.
  const asUser = await http.call('GET', '/v1/desktops/rp/restore-points', undefined, dora);
  assert.equal(asUser.body.canRestore, false);
  assert.match(String(asUser.body.reason), /policy/);
  const denied = await http.call('POST', '/v1/desktops/rp/restore', { snapshotId: after[1]!.id }, dora);
  assert.deepEqual([denied.status, denied.body.error], [403, 'policy-denied']);
  await http.call('PUT', '/v1/admin/policies/desktop/rp', { restoreAllowed: true }, token);
  const ok = await http.call('POST', '/v1/desktops/rp/restore', { snapshotId: after[1]!.id }, dora);
  assert.equal(ok.status, 200, JSON.stringify(ok.body));
  assert.equal((await http.call('GET', '/v1/desktops/other/restore-points', undefined, dora)).status, 403, 'not entitled: the same answer as for a desktop that does not exist');
  const bogus = await http.call('POST', '/v1/desktops/rp/restore', { snapshotId: 'nope' }, token);
  assert.equal(bogus.status, 404);
  const events = (await http.call('GET', '/v1/admin/audit?action=restore', undefined, token)).body.events as { actor: string; outcome: string }[];
  assert.deepEqual(events.map((e) => [e.actor, e.outcome]), [['dora', 'ok'], ['dora', 'denied'], [ADMIN.name, 'ok']]);
});

test('groups and pools can be removed; a pool with desktops cannot; audit newest first, filtered, as CSV', async () => {
  await http.call('POST', '/v1/admin/users', { name: 'erin', password: 'erin-password' }, token);
  await http.call('POST', '/v1/admin/groups', { name: 'ops', members: ['erin'] }, token);
  assert.equal((await http.call('DELETE', '/v1/admin/groups/ops/members/erin', undefined, token)).status, 200);
  assert.equal((await http.call('DELETE', '/v1/admin/groups/ops/members/erin', undefined, token)).status, 404);
  assert.deepEqual((await http.call('GET', '/v1/admin/groups', undefined, token)).body.groups, [{ name: 'ops', members: [] }]);
  await http.call('POST', '/v1/admin/entitlements', { principalType: 'group', principal: 'ops', targetType: 'desktop', target: 'rp' }, token);
  assert.equal((await http.call('DELETE', '/v1/admin/groups/ops', undefined, token)).status, 200);
  assert.equal(((await http.call('GET', '/v1/admin/entitlements', undefined, token)).body.entitlements as { principal: string }[]).some((e) => e.principal === 'ops'), false);

  await http.call('POST', '/v1/admin/pools', { name: 'lab' }, token);
  await http.call('POST', '/v1/admin/desktops', { name: 'lab1', cloneOf: 'rp', pool: 'lab' }, token);
  const busy = await http.call('DELETE', '/v1/admin/pools/lab', undefined, token);
  assert.deepEqual([busy.status, busy.body.error], [409, 'not-empty']);
  await http.call('DELETE', '/v1/admin/desktops/lab1', undefined, token);
  assert.equal((await http.call('DELETE', '/v1/admin/pools/lab', undefined, token)).status, 200);

  const newest = (await http.call('GET', '/v1/admin/audit?limit=3', undefined, token)).body.events as { id: number; action: string }[];
  assert.equal(newest[0]!.action, 'pool-delete');
  assert.ok(newest[0]!.id > newest[1]!.id && newest[1]!.id > newest[2]!.id);
  const older = (await http.call('GET', `/v1/admin/audit?limit=1&before=${newest[2]!.id}`, undefined, token)).body.events as { id: number }[];
  assert.ok(older[0]!.id < newest[2]!.id);
  const found = (await http.call('GET', '/v1/admin/audit?q=ops', undefined, token)).body.events as { detail: string }[];
  assert.ok(found.length >= 2 && found.every((e) => /ops/.test(JSON.stringify(e))));
  const agent = pinnedAgent(broker.fingerprint);
  try {
    const csv = await request(`${broker.url}/v1/admin/audit?format=csv&action=group-delete`, { dispatcher: agent, headers: { authorization: `Bearer ${token}` } });
    assert.match(String(csv.headers['content-type']), /text\/csv/);
    assert.match(String(csv.headers['content-disposition']), /attachment; filename="carryon-audit-/);
    const lines = (await csv.body.text()).trim().split('\n');
    assert.equal(lines[0], 'id,time,actor,desktopId,action,outcome,detail');
    assert.equal(lines.length, 2);
    assert.match(lines[1]!, /"group-delete","ok","ops"$/);
  } finally {
    await agent.close();
  }
});

test('the console is served at / with a strict CSP; its assets exist', async () => {
  const agent = pinnedAgent(broker.fingerprint);
  try {
    const page = await request(`${broker.url}/`, { dispatcher: agent });
    assert.equal(page.statusCode, 200);
    assert.match(String(page.headers['content-security-policy']), /default-src 'self'/);
    const html = await page.body.text();
    const js = /src="(\/assets\/[^"]+\.js)"/.exec(html)?.[1];
    assert.ok(js, 'the page loads a script');
    const asset = await request(`${broker.url}${js}`, { dispatcher: agent });
    assert.equal(asset.statusCode, 200);
    assert.match(String(asset.headers['content-type']), /javascript/);
    await asset.body.dump();
  } finally {
    await agent.close();
  }
});
