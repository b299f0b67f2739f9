import assert from 'node:assert/strict';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { checkout, enroll, type ClientEnv } from '../../src/client/ops.js';
import { startStandaloneTransfer } from '../../src/transfer/standalone.js';
import type { TransferServer } from '../../src/transfer/server.js';
import { request } from 'undici';
import { pinnedAgent } from '../../src/net/pinned-agent.js';
import { pushRevocations } from '../../src/broker/transfers/revoke-push.js';
import { signRevocation } from '../../src/core/tokens/revocation.js';
import { generateSigningKey } from '../../src/core/signing.js';
import { enrolDevice, HOST } from '../broker/trust-helpers.js';
import { ADMIN, api, cleanup, makeImage, testBroker, transferStore, type Api, type TestBroker } from '../broker/harness.js';

process.env.CARRYON_SCRYPT_N = '1024';
let broker: TestBroker;
let http: Api;
let ts: TransferServer & { heartbeat(): Promise<void> };

before(async () => {
  broker = await testBroker(undefined, { embeddedTransferSlots: 0 });
  http = api(broker.url, broker.fingerprint);
});
after(async () => {
  await ts?.close();
  await http.close();
  await broker.close();
  cleanup(broker.dir);
});

test('a standalone transfer server registers with the broker and serves a check-out', async () => {
  ts = await startStandaloneTransfer({
    id: 'ts-remote', brokerUrl: broker.url, brokerFingerprint: broker.fingerprint, secret: broker.ctx.settings.transferSecret,
    slots: 2, storeDir: transferStore(broker), masterKeyFile: join(broker.dir, 'master.key'), port: 0, tlsDir: join(broker.dir, 'ts-tls'),
  });
  const admin = await http.login(ADMIN.name, ADMIN.password);
  const overview = (await http.call('GET', '/v1/admin/transfers', undefined, admin)).body as { servers: { id: string; slots: number; alive: boolean }[] };
  assert.deepEqual(overview.servers.map((s) => [s.id, s.slots, s.alive]), [['ts-remote', 2, true]]);
  const wrong = await http.call('POST', '/v1/transfer-servers/register', { id: 'evil', url: 'https://127.0.0.1:1', slots: 1, fingerprint: 'a'.repeat(64) });
  assert.equal(wrong.status, 401);

  await http.call('POST', '/v1/admin/users', { name: 'alice', password: 'alice-password' }, admin);
  await http.call('POST', '/v1/admin/desktops', { name: 'win11', image: makeImage(broker.dir, 4), config: { vcpus: 1, ramMiB: 512, minRamMiB: 256 } }, admin);
  await http.call('POST', '/v1/admin/entitlements', { principalType: 'user', principal: 'alice', targetType: 'desktop', target: 'win11' }, admin);
  const env: ClientEnv = { home: join(broker.dir, 'laptop'), user: 'alice', password: async () => 'alice-password', log: () => undefined, pollMs: 20 };
  await enroll(env, broker.url, { fingerprint: broker.fingerprint, name: 'l' });
  const res = await checkout(env, 'win11');
  assert.ok(res.chunksMoved > 0 && res.bytesMoved > 0);
  assert.ok(ts.stats.bytesOut >= res.bytesMoved, 'the bytes came from the standalone server');
});

test('a cancel revokes the ticket on a standalone transfer server at once (pushed, signed for it); forged pushes are refused; per-job chunk access is reported', async () => {
  const admin = await http.login(ADMIN.name, ADMIN.password);
  for (const c of await broker.ctx.meta.listCheckouts({ activeOnly: true })) await http.call('POST', `/v1/admin/checkouts/${c.id}/force-unlock`, {}, admin);
  const alice = await http.login('alice', 'alice-password');
  const dev = await enrolDevice(http, broker.url, broker.fingerprint, alice, 'second');
  const co = await http.call('POST', '/v1/desktops/win11/checkout', { deviceId: dev.id, host: HOST }, alice);
  assert.equal(co.status, 201);
  const job = co.body.job as { transfer: { url: string; ticket: string; fingerprint: string } };
  const agent = pinnedAgent(job.transfer.fingerprint);
  const ask = async () => {
    const r = await request(`${job.transfer.url}/v1/chunks/fetch`, { method: 'POST', dispatcher: agent, headers: { authorization: `Ticket ${job.transfer.ticket}`, 'content-type': 'application/json' }, body: '{"ids":[]}' });
    const bytes = Buffer.from(await r.body.arrayBuffer());
    return [r.statusCode, r.statusCode === 200 ? undefined : (JSON.parse(bytes.toString()) as { error?: string }).error];
  };
  try {
    assert.deepEqual(await ask(), [200, undefined]);
    assert.equal((await http.call('POST', `/v1/checkouts/${(co.body.checkout as { id: string }).id}/cancel`, {}, alice)).status, 200);
    // No heartbeat in between: the broker pushed the revocation before it answered the cancel.
    assert.deepEqual(await ask(), [403, 'ticket-revoked']);
    const fetch = await request(`${job.transfer.url}/v1/chunks/fetch`, { method: 'POST', dispatcher: agent, headers: { authorization: `Ticket ${job.transfer.ticket}`, 'content-type': 'application/json' }, body: '{"ids":[]}' });
    assert.deepEqual([fetch.statusCode, ((await fetch.body.json()) as { error?: string }).error], [403, 'ticket-revoked']);
    // A heartbeat answered before the cancel cannot bring the ticket back; the next one keeps it revoked.
    ts.setRevoked([]);
    assert.deepEqual(await ask(), [403, 'ticket-revoked']);
    await ts.heartbeat();
    assert.deepEqual(await ask(), [403, 'ticket-revoked']);

    // Only the broker's signature, for this server, revokes.
    const revoke = async (revocation: string) => {
      const r = await request(`${job.transfer.url}/v1/revoke`, { method: 'POST', dispatcher: agent, headers: { 'content-type': 'application/json' }, body: JSON.stringify({ revocation }) });
      return [r.statusCode, ((await r.body.json()) as { error?: string }).error];
    };
    const payload = { v: 1 as const, kind: 'revoke' as const, serverId: 'ts-remote', jobIds: ['some-job'], issuedAt: new Date().toISOString() };
    assert.deepEqual(await revoke(signRevocation(payload, generateSigningKey().privateKey)), [401, 'bad-revocation']);
    assert.deepEqual(await revoke(signRevocation({ ...payload, serverId: 'elsewhere' }, broker.ctx.secrets.signing.privateKey)), [401, 'bad-revocation']);
    assert.deepEqual(await revoke('garbage'), [401, 'bad-revocation']);
    assert.deepEqual(await revoke(signRevocation(payload, broker.ctx.secrets.signing.privateKey)), [200, undefined]);
    // An unreachable server is skipped quickly (it learns the list at its next heartbeat).
    const t0 = Date.now();
    const dead = await pushRevocations([{ id: 'gone', url: 'https://127.0.0.1:9', fingerprint: 'a'.repeat(64) }], ['x'], broker.ctx.secrets.signing.privateKey, 500);
    assert.deepEqual(dead, { reached: [], missed: ['gone'] });
    assert.ok(Date.now() - t0 < 3000);
  } finally {
    await agent.close();
  }
  // The first test's check-out job ended (done) and was evicted: its summary rode the heartbeat.
  await ts.heartbeat();
  const events = await broker.ctx.meta.listEvents({ limit: 10_000 });
  const access = events.filter((e) => e.action === 'chunk-access' && e.actor === 'transfer:ts-remote');
  assert.ok(access.some((e) => /\(download, ended\): [1-9]\d* chunks/.test(e.detail ?? '')), JSON.stringify(access));
});
