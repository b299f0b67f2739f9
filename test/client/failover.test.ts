import assert from 'node:assert/strict';
import { mkdtempSync, rmSync } from 'node:fs';
import { createServer, type Server } from 'node:https';
import type { AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { z } from 'zod';
import { BrokerClient, BrokerError } from '../../src/net/broker-client.js';
import { splitList } from '../../src/client/session/brokers.js';
import { brokerEndpoints, DeviceFile } from '../../src/client/vault/home.js';
import { BrokerUnreachable, classifyGatewayAnswer, classifyNetworkError } from '../../src/net/failover.js';
import { loadOrCreateTls } from '../../src/net/tls-cert.js';
import { freePort } from '../support/ports.js';

/** A fake broker: answers what `answer` says, counts the requests that reached it. */
interface Fake { url: string; fingerprint: string; hits: string[]; answer: (path: string) => { status: number; body: string } | 'hang'; close(): Promise<void> }

const dir = mkdtempSync(join(tmpdir(), 'carryon-failover-'));
const servers: Server[] = [];
let n = 0;

async function fake(answer: Fake['answer']): Promise<Fake> {
  const tls = await loadOrCreateTls({ dir: join(dir, `tls-${n++}`) });
  const f: Fake = { url: '', fingerprint: tls.fingerprint, hits: [], answer, close: async () => undefined };
  const server = createServer({ cert: tls.cert, key: tls.key }, (req, res) => {
    f.hits.push(`${req.method} ${req.url}`);
    req.resume();
    const a = f.answer(req.url ?? '/');
    if (a === 'hang') return; // never answers
    res.writeHead(a.status, { 'content-type': 'application/json' }).end(a.body);
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  servers.push(server);
  f.url = `https://127.0.0.1:${(server.address() as AddressInfo).port}`;
  return f;
}

const ok = () => ({ status: 200, body: JSON.stringify({ ok: true }) });
const Ok = z.object({ ok: z.boolean() });
let deadUrl: string;

before(async () => {
  deadUrl = `https://127.0.0.1:${await freePort()}`; // nothing listens there: connection refused
});
after(async () => {
  for (const s of servers) {
    s.closeAllConnections();
    await new Promise((r) => s.close(r));
  }
  rmSync(dir, { recursive: true, force: true });
});

test('network errors are classified: refused, unreachable, TLS and pin failures were never sent; resets and timeouts may have been applied', () => {
  for (const code of ['ECONNREFUSED', 'ENOTFOUND', 'EHOSTUNREACH', 'UND_ERR_CONNECT_TIMEOUT', 'pin-mismatch', 'ERR_SSL_WRONG_VERSION_NUMBER']) {
    assert.equal(classifyNetworkError(Object.assign(new Error(code), { code })), 'unsent', code);
  }
  for (const code of ['ECONNRESET', 'UND_ERR_SOCKET', 'UND_ERR_HEADERS_TIMEOUT', 'UND_ERR_BODY_TIMEOUT', undefined]) {
    assert.equal(classifyNetworkError(Object.assign(new Error(String(code)), { code })), 'maybe-applied', String(code));
  }
  assert.equal(classifyNetworkError(Object.assign(new Error('fetch failed'), { cause: Object.assign(new Error('x'), { code: 'ECONNREFUSED' }) })), 'unsent');
  // A gateway's answer is a failure; the broker's own (JSON error code) is an answer, even a 503.
  assert.equal(classifyGatewayAnswer(503, null), 'unsent');
  assert.equal(classifyGatewayAnswer(502, {}), 'maybe-applied');
  assert.equal(classifyGatewayAnswer(504, null), 'maybe-applied');
  assert.equal(classifyGatewayAnswer(503, { error: 'directory-unavailable' }), null);
  assert.equal(classifyGatewayAnswer(500, null), null);
});

test('a dead broker first in the list is skipped, and the one that answered is asked first from then on', async () => {
  const live = await fake(ok);
  const logs: string[] = [];
  const b = new BrokerClient([{ url: deadUrl, fingerprint: live.fingerprint }, { url: live.url, fingerprint: live.fingerprint }], '', (l) => logs.push(l));
  try {
    assert.deepEqual(await b.call('GET', '/v1/x', undefined, Ok), { ok: true });
    // Not repeatable, but a refused connection proves it was never sent: it goes to the next one too.
    assert.deepEqual(await b.call('POST', '/v1/y', {}, Ok), { ok: true });
    assert.equal(b.url, live.url);
    assert.deepEqual(live.hits, ['GET /v1/x', 'POST /v1/y']);
    assert.equal(logs.filter((l) => l.includes(deadUrl)).length, 1, 'the dead broker was tried once, then the live one stayed first');
  } finally {
    await b.close();
  }
});

test('a broker whose certificate is not its pinned one is never sent a request, and is dropped for good', async () => {
  const impostor = await fake(ok);
  const live = await fake(ok);
  const logs: string[] = [];
  const b = new BrokerClient([{ url: impostor.url, fingerprint: live.fingerprint }, { url: live.url, fingerprint: live.fingerprint }], '', (l) => logs.push(l));
  try {
    assert.deepEqual(await b.call('POST', '/v1/y', {}, Ok), { ok: true });
    assert.equal(impostor.hits.length, 0, 'nothing reached the impostor');
    assert.match(logs.join('\n'), /presents a certificate other than its pinned one: not used/);
  } finally {
    await b.close();
  }
  // Alone in the list: a clear pin-mismatch error, not "offline".
  const only = new BrokerClient(impostor.url, live.fingerprint);
  try {
    await assert.rejects(only.call('GET', '/v1/x', undefined, Ok), (e: unknown) => e instanceof BrokerUnreachable && e.code === 'pin-mismatch' && /does not match the pinned/.test(e.message) && !e.maybeApplied);
    assert.equal(impostor.hits.length, 0);
  } finally {
    await only.close();
  }
});

test("a broker's own error (4xx, or a 503 with its error code) is an answer: never tried elsewhere", async () => {
  const first = await fake((p) => (p === '/v1/gone' ? { status: 404, body: JSON.stringify({ error: 'not-found', message: 'no such thing' }) } : { status: 503, body: JSON.stringify({ error: 'directory-unavailable', message: 'ldap down' }) }));
  const second = await fake(ok);
  const b = new BrokerClient([first, second], '');
  try {
    await assert.rejects(b.call('GET', '/v1/gone', undefined, Ok), (e: unknown) => e instanceof BrokerError && e.status === 404 && e.code === 'not-found');
    await assert.rejects(b.call('POST', '/v1/auth/login', {}, Ok, {}, { repeatable: true }), (e: unknown) => e instanceof BrokerError && e.code === 'directory-unavailable');
    assert.equal(second.hits.length, 0);
  } finally {
    await b.close();
  }
});

test('a gateway 503 fails over; a 502 or a timeout fails over only a repeatable request, else says it may have been applied', async () => {
  let mode: '503' | '502' | 'hang' = '503';
  const gateway = await fake(() => (mode === 'hang' ? 'hang' : { status: Number(mode), body: '<html>bad gateway</html>' }));
  const live = await fake(ok);
  const list = [gateway, live];
  const fresh = () => new BrokerClient(list, '', () => undefined, { answerMs: 300 });
  for (const m of ['503', '502', 'hang'] as const) {
    mode = m;
    const b = fresh();
    try {
      const before = live.hits.length;
      if (m === '503') {
        assert.deepEqual(await b.call('POST', '/v1/commit', {}, Ok), { ok: true }, 'a 503 from a gateway: the request never reached a broker');
        assert.equal(live.hits.length, before + 1);
        continue;
      }
      await assert.rejects(b.call('POST', '/v1/commit', {}, Ok), (e: unknown) => e instanceof BrokerUnreachable && e.maybeApplied && e.code === 'offline' && /may have been applied/.test(e.message), m);
      assert.equal(live.hits.length, before, `${m}: a request that may have been applied is not sent again`);
      assert.deepEqual(await b.call('POST', '/v1/begin', {}, Ok, {}, { repeatable: true }), { ok: true });
      assert.deepEqual(await b.call('GET', '/v1/jobs/1', undefined, Ok), { ok: true });
      assert.equal(live.hits.length, before + 2);
    } finally {
      await b.close();
    }
  }
});

test('every broker down: one error naming each, bounded to one attempt per broker', async () => {
  const b = new BrokerClient([{ url: deadUrl, fingerprint: 'a'.repeat(64) }, { url: `https://127.0.0.1:${await freePort()}`, fingerprint: 'b'.repeat(64) }], '');
  try {
    await assert.rejects(b.call('GET', '/v1/x', undefined, Ok), (e: unknown) => e instanceof BrokerUnreachable && e.code === 'offline' && /any of the 2 brokers/.test(e.message) && e.message.includes(deadUrl));
  } finally {
    await b.close();
  }
});

test('device files: an older single-broker file reads as a one-broker list; lists split on commas', () => {
  const old = DeviceFile.parse({ deviceId: 'd', name: 'n', brokerUrl: 'https://a:1', fingerprint: 'c'.repeat(64), signingPublicKey: 'k', secretStorage: 'file' });
  assert.deepEqual(brokerEndpoints(old), [{ url: 'https://a:1', fingerprint: 'c'.repeat(64) }]);
  const listed = DeviceFile.parse({ ...old, brokers: [{ url: 'https://b:1', fingerprint: 'd'.repeat(64) }, { url: 'https://a:1', fingerprint: 'c'.repeat(64) }] });
  assert.deepEqual(brokerEndpoints(listed).map((e) => e.url), ['https://b:1', 'https://a:1']);
  assert.deepEqual(splitList(['https://a:1,https://b:2', ' https://c:3 ']), ['https://a:1', 'https://b:2', 'https://c:3']);
  assert.deepEqual(splitList(undefined), []);
});
