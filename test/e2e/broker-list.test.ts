import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { readFileSync, writeFileSync } from 'node:fs';
import { createServer, type Server } from 'node:https';
import type { AddressInfo } from 'node:net';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { request } from 'undici';
import type { RunningBroker } from '../../src/broker/start.js';
import { exportCurrentSnapshot } from '../../src/broker/desktops/snapshot-image.js';
import { addBrokers, listBrokers, removeBrokers } from '../../src/client/session/brokers.js';
import { checkout, enroll, listDesktops, upload, type ClientEnv } from '../../src/client/ops.js';
import { pinnedAgent } from '../../src/net/pinned-agent.js';
import { loadOrCreateTls } from '../../src/net/tls-cert.js';
import { ADMIN, api, cleanup, makeImage, testBroker, type Api } from '../broker/harness.js';
import { readDesktop, writeDesktop } from '../support/laptop.js';
import { freePort } from '../support/ports.js';

process.env.CARRYON_SCRYPT_N = '1024';
let broker: RunningBroker & { dir: string };
let http: Api;
const servers: Server[] = [];
const logs: string[] = [];
const CHUNK = 256 * 1024;

function env(home: string): ClientEnv {
  return { home, user: 'alice', password: async () => 'alice-password', log: (l) => logs.push(l), pollMs: 20 };
}

async function listen(server: Server): Promise<string> {
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  servers.push(server);
  return `https://127.0.0.1:${(server.address() as AddressInfo).port}`;
}

/**
 * A TLS front for the broker with the broker's own certificate (so its pin matches), as a load
 * balancer would be: passes requests through, except that it drops the answer to the first
 * commit after the broker applied it (the answer lost on the way back).
 */
async function lossyFront(): Promise<{ url: string; commits: number }> {
  const tls = await loadOrCreateTls({ dir: broker.dir });
  const agent = pinnedAgent(broker.fingerprint);
  const state = { url: '', commits: 0 };
  const server = createServer({ cert: tls.cert, key: tls.key }, (req, res) => {
    const parts: Buffer[] = [];
    req.on('data', (d: Buffer) => parts.push(d));
    req.on('end', () => {
      const body = parts.length ? Buffer.concat(parts) : undefined;
      const headers = Object.fromEntries(Object.entries(req.headers).filter(([k]) => !['host', 'connection', 'content-length'].includes(k))) as Record<string, string>;
      void request(`${broker.url}${req.url}`, { method: req.method as 'GET', headers, body, dispatcher: agent }).then(async (up) => {
        const text = await up.body.text();
        if (/\/commit$/.test(req.url ?? '') && state.commits++ === 0) return void req.socket.destroy();
        res.writeHead(up.statusCode, { 'content-type': 'application/json' }).end(text);
      }, () => req.socket.destroy());
    });
  });
  server.on('close', () => void agent.close());
  state.url = await listen(server);
  return state;
}

before(async () => {
  broker = await testBroker();
  http = api(broker.url, broker.fingerprint);
  const admin = await http.login(ADMIN.name, ADMIN.password);
  await http.call('POST', '/v1/admin/users', { name: 'alice', password: 'alice-password' }, admin);
  await http.call('POST', '/v1/admin/desktops', { name: 'win11', image: makeImage(broker.dir, 4), config: { vcpus: 1, ramMiB: 512, minRamMiB: 256 } }, admin);
  await http.call('POST', '/v1/admin/entitlements', { principalType: 'user', principal: 'alice', targetType: 'desktop', target: 'win11' }, admin);
});
after(async () => {
  for (const s of servers) {
    s.closeAllConnections();
    await new Promise((r) => s.close(r));
  }
  await http.close();
  await broker.close();
  cleanup(broker.dir);
});

test('a laptop with a dead broker first in its list enrols, checks out and checks in through the live one', async () => {
  const dead = `https://127.0.0.1:${await freePort()}`;
  const home = join(broker.dir, 'laptop-a');
  // The dead broker cannot show its certificate now: it is pinned to the fingerprint given for it.
  const res = await enroll(env(home), [`${dead},${broker.url}`], { fingerprint: [broker.fingerprint], name: 'a' });
  assert.deepEqual(res.brokers.map((b) => b.url), [dead, broker.url]);
  assert.match(logs.join('\n'), /cannot be reached now .* pinned to the fingerprint given/);
  await checkout(env(home), 'win11');
  await writeDesktop(env(home), 'win11', [{ offset: 3 * CHUNK + 100, data: randomBytes(3000) }]);
  const laptop = await readDesktop(env(home), 'win11');
  const ci = await upload(env(home), 'win11', 'checkin');
  assert.equal(ci.changedChunks, 1);
  const out = join(broker.dir, 'a.raw');
  await exportCurrentSnapshot(broker.ctx, 'win11', out);
  assert.ok(readFileSync(out).equals(laptop), 'the snapshot holds what the laptop wrote');

  // An older device.json (one broker, no list) keeps working; `brokers add/remove` edit the list.
  const file = join(home, 'device.json');
  const { brokers: _list, ...old } = JSON.parse(readFileSync(file, 'utf8')) as Record<string, unknown>;
  writeFileSync(file, JSON.stringify({ ...old, brokerUrl: broker.url }));
  assert.deepEqual((await listBrokers(home)).map((b) => b.url), [broker.url]);
  assert.equal((await listDesktops(env(home))).length, 1);
  assert.deepEqual((await addBrokers(env(home), [dead], { fingerprint: [broker.fingerprint] })).map((b) => b.url), [broker.url, dead]);
  assert.deepEqual((await removeBrokers(home, [dead])).map((b) => b.url), [broker.url]);
  await assert.rejects(removeBrokers(home, [broker.url]), /leave no broker/);
});

test('a broker whose certificate is not the pinned one is never used; alone, it is a clear pin-mismatch', async () => {
  const other = await loadOrCreateTls({ dir: join(broker.dir, 'impostor-tls') });
  let reached = 0;
  const impostor = await listen(createServer({ cert: other.cert, key: other.key }, (_req, res) => {
    reached++;
    res.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify({ version: '0', signingPublicKey: 'not-the-deployment-key' }));
  }));
  const home = join(broker.dir, 'laptop-b');
  // At enrolment a certificate that differs from the one given is refused outright.
  await assert.rejects(enroll(env(home), [impostor, broker.url], { fingerprint: [broker.fingerprint], name: 'b' }), (e: unknown) => (e as { code?: string }).code === 'pin-mismatch' && /presents certificate/.test((e as Error).message));
  await enroll(env(home), [broker.url], { fingerprint: [broker.fingerprint], name: 'b' });
  // A broker of another deployment cannot be added, whatever its certificate.
  await assert.rejects(addBrokers(env(home), [impostor], { fingerprint: [other.fingerprint] }), /another deployment/);
  assert.equal(reached, 1, 'only the signing-key check reached it');
  reached = 0;

  const file = join(home, 'device.json');
  const device = JSON.parse(readFileSync(file, 'utf8')) as Record<string, unknown>;
  // Its certificate changed under the same URL (or someone else answers there): skipped, the next one used.
  writeFileSync(file, JSON.stringify({ ...device, brokers: [{ url: impostor, fingerprint: broker.fingerprint }, { url: broker.url, fingerprint: broker.fingerprint }] }));
  assert.equal((await listDesktops(env(home))).length, 1);
  assert.match(logs.join('\n'), new RegExp(`broker ${impostor} presents a certificate other than its pinned one: not used`));
  // Alone in the list: no request is sent, and the error says why.
  writeFileSync(file, JSON.stringify({ ...device, brokers: [{ url: broker.url, fingerprint: 'e'.repeat(64) }] }));
  await assert.rejects(listDesktops(env(home)), (e: unknown) => (e as { code?: string }).code === 'pin-mismatch' && /does not match the pinned e{64}/.test((e as Error).message));
  assert.equal(reached, 0, 'nothing reached the impostor');
});

test('a commit whose answer is lost after the broker applied it is recognised, not applied twice', async () => {
  const front = await lossyFront();
  const home = join(broker.dir, 'laptop-c');
  await enroll(env(home), [front.url, broker.url], { fingerprint: [broker.fingerprint], name: 'c' });
  await checkout(env(home), 'win11');
  await writeDesktop(env(home), 'win11', [{ offset: 7 * CHUNK, data: randomBytes(4096) }]);
  const laptop = await readDesktop(env(home), 'win11');
  const before = (await broker.ctx.meta.listSnapshots((await broker.ctx.meta.getDesktop('win11'))!.id)).filter((s) => s.kind === 'checkin').length;
  const ci = await upload(env(home), 'win11', 'checkin');
  assert.equal(front.commits, 1, 'the commit was sent again to the next broker, not through the front that lost the answer');
  const checkins = (await broker.ctx.meta.listSnapshots((await broker.ctx.meta.getDesktop('win11'))!.id)).filter((s) => s.kind === 'checkin');
  assert.equal(checkins.length, before + 1, 'one snapshot: the commit was applied once');
  assert.equal(ci.snapshotId, checkins[checkins.length - 1]!.id, 'the laptop learned the snapshot the lost answer named');
  const out = join(broker.dir, 'c.raw');
  await exportCurrentSnapshot(broker.ctx, 'win11', out);
  assert.ok(readFileSync(out).equals(laptop));
  assert.match(logs.join('\n'), /may have been applied|did not answer/);
});
