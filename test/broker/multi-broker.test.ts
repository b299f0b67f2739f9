import assert from 'node:assert/strict';
import { copyFileSync, mkdirSync, mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { generateSigningKey, publicKeyToBase64 } from '../../src/core/signing.js';
import { freshDatabase, testCluster } from '../support/postgres.js';
import { testChunkStore } from '../support/swift.js';
import { ADMIN, api, cleanup, makeImage, testBroker, type Api, type TestBroker } from './harness.js';

/**
 * Several brokers on one PostgreSQL database and one chunk store (issue 13): they share the
 * secrets (copied into each data directory, as an operator would), the lock, the scheduler's
 * servers and queue, the audit chain and replay protection.
 */
let a: TestBroker;
let b: TestBroker;
let ha: Api;
let hb: Api;
let desktopId: string;
const tokens: Record<string, string> = {};
const devices: Record<string, string> = {};
const host = { cpus: 8, ramBytes: 16 * 2 ** 30, freeDiskBytes: 100 * 2 ** 30 };

before(async () => {
  const database = await freshDatabase(await testCluster());
  const root = mkdtempSync(join(tmpdir(), 'carryon-brokers-'));
  const chunkStore = (await testChunkStore()) ?? join(root, 'chunks');
  a = await testBroker(join(root, 'a'), { database, chunkStore, embeddedTransferId: 'embedded-a' });
  mkdirSync(join(root, 'b'));
  for (const f of ['master.key', 'token.key', 'signing.key', 'transfer.secret']) copyFileSync(join(root, 'a', f), join(root, 'b', f));
  b = await testBroker(join(root, 'b'), { database, chunkStore, embeddedTransferId: 'embedded-b', importDirs: [join(root, 'a')] });
  [ha, hb] = [api(a.url, a.fingerprint), api(b.url, b.fingerprint)];
  const admin = await ha.login(ADMIN.name, ADMIN.password);
  for (const name of ['alice', 'bob']) assert.equal((await ha.call('POST', '/v1/admin/users', { name, password: `${name}-password` }, admin)).status, 201);
  const created = await ha.call('POST', '/v1/admin/desktops', { name: 'win11', image: makeImage(a.dir, 4), config: { vcpus: 2, ramMiB: 2048, minRamMiB: 512 } }, admin);
  assert.equal(created.status, 201, JSON.stringify(created.body));
  desktopId = String(created.body.id);
  for (const name of ['alice', 'bob']) {
    assert.equal((await ha.call('POST', '/v1/admin/entitlements', { principalType: 'user', principal: name, targetType: 'desktop', target: 'win11' }, admin)).status, 201);
    // A session from one broker is good on the other: they share the token key.
    tokens[name] = await (name === 'alice' ? ha : hb).login(name, `${name}-password`);
    const dev = await (name === 'alice' ? hb : ha).call('POST', '/v1/devices', { name: `${name}-laptop`, publicKey: publicKeyToBase64(generateSigningKey().publicKey), host }, tokens[name]);
    assert.equal(dev.status, 201);
    devices[name] = String(dev.body.deviceId);
  }
});
after(async () => {
  await ha?.close();
  await hb?.close();
  await b?.close();
  await a?.close();
  cleanup(join(a.dir, '..'));
});

test('two brokers racing to check out one desktop: exactly one wins, the other gets 409; the lock is seen through both', async () => {
  const [ra, rb] = await Promise.all([
    ha.call('POST', `/v1/desktops/${desktopId}/checkout`, { deviceId: devices.alice, host }, tokens.alice),
    hb.call('POST', `/v1/desktops/${desktopId}/checkout`, { deviceId: devices.bob, host }, tokens.bob),
  ]);
  assert.deepEqual([ra.status, rb.status].sort(), [201, 409], JSON.stringify([ra.body, rb.body]));
  const [win, lose, winner, loser] = ra.status === 201 ? [ra, rb, 'alice', 'bob'] : [rb, ra, 'bob', 'alice'];
  assert.equal(lose.body.error, 'already-checked-out');
  assert.match(String(lose.body.message), /win11 is already checked out/);
  const co = (win.body as { checkout: { id: string } }).checkout;
  for (const h of [ha, hb]) {
    const seen = ((await h.call('GET', '/v1/desktops', undefined, tokens[loser])).body.desktops as { state: string; actions: string[] }[])[0]!;
    assert.deepEqual([seen.state, seen.actions], ['transferring', []], 'the loser sees the lock on either broker');
  }
  // The winner carries on through the other broker: state, scheduler and lock are shared.
  const other = winner === 'alice' ? hb : ha;
  assert.equal((await other.call('POST', `/v1/checkouts/${co.id}/transferred`, {}, tokens[winner])).status, 200);
  assert.equal((await a.ctx.meta.getCheckout(co.id))?.state, 'checked_out');
  const again = await ha.call('POST', `/v1/desktops/${desktopId}/checkout`, { deviceId: devices[loser], host }, tokens[loser]);
  assert.deepEqual([again.status, again.body.error], [409, 'already-checked-out']);
});

test('transfer servers of both brokers register in one scheduler; the audit trail of both is one chain', async () => {
  const admin = await hb.login(ADMIN.name, ADMIN.password);
  const servers = ((await ha.call('GET', '/v1/admin/transfers', undefined, admin)).body.servers as { id: string; alive: boolean }[]).map((s) => s.id);
  assert.deepEqual(servers, ['embedded-a', 'embedded-b']);
  const [ca, cb] = [await a.ctx.meta.verifyAuditChain(), await b.ctx.meta.verifyAuditChain()];
  assert.equal(ca.ok, true);
  assert.deepEqual(cb, ca, 'both brokers verify the same chain, to the same head');
  const actors = new Set((await b.ctx.meta.listEvents({ limit: 10_000 })).map((e) => e.actor));
  assert.ok(actors.has('alice') && actors.has('bob'));
});
