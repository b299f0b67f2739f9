import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, test } from 'node:test';
import Fastify, { type FastifyInstance } from 'fastify';
import { blobFrame, endFrame } from '../../src/core/chunks/frames.js';
import { BrokerClient, BrokerError } from '../../src/net/broker-client.js';
import { loadOrCreateTls } from '../../src/net/tls-cert.js';
import { fetchBlobs, TransferSession } from '../../src/transfer-client/client.js';

// Stand-ins for a broker and a transfer server of the release before `unlock` and `have`: their
// routes refuse an unknown field with a 400 naming it, as zod's strict objects do.
const dir = await mkdtemp(join(tmpdir(), 'carryon-fallback-'));
const tls = await loadOrCreateTls({ dir });
const apps: FastifyInstance[] = [];
after(async () => {
  await Promise.all(apps.map((a) => a.close()));
  await rm(dir, { recursive: true, force: true });
});

async function olderServer(route: string, field: string, answer: () => unknown, refusal: () => string | null = () => null): Promise<{ url: string; bodies: Record<string, unknown>[] }> {
  const app = Fastify({ https: { cert: tls.cert, key: tls.key }, logger: false });
  apps.push(app);
  const bodies: Record<string, unknown>[] = [];
  app.post(route, async (req, reply) => {
    const body = req.body as Record<string, unknown>;
    bodies.push(body);
    const other = refusal();
    if (other) return reply.status(400).send({ error: 'invalid', message: other });
    if (field in body) return reply.status(400).send({ error: 'invalid', message: `Unrecognized key: "${field}"` });
    return answer();
  });
  await app.listen({ host: '127.0.0.1', port: 0 });
  const addr = app.server.address();
  return { url: `https://127.0.0.1:${typeof addr === 'object' && addr ? addr.port : 0}`, bodies };
}

test('an older broker refuses `unlock` in a login: asked again without it (no share), and only for that refusal', async () => {
  let other: string | null = null;
  const broker = await olderServer('/v1/auth/login', 'unlock', () => ({ token: 't', expiresAt: new Date(Date.now() + 60_000).toISOString(), user: { name: 'alice', role: 'user' } }), () => other);
  const client = new BrokerClient(broker.url, tls.fingerprint);
  try {
    await client.login('alice', 'pw', 'dev1', 'checkout-1');
    assert.deepEqual(broker.bodies.map((b) => 'unlock' in b), [true, false]);
    assert.equal(client.token, 't');
    assert.equal(client.takeUnlockShare('checkout-1'), null);
    // Without `unlock` nothing is asked twice.
    await client.login('alice', 'pw', 'dev1');
    assert.equal(broker.bodies.length, 3);
    // A 400 for anything else is the answer: no second try.
    other = 'username: too long';
    await assert.rejects(client.login('alice', 'pw', 'dev1', 'checkout-1'), (e: unknown) => e instanceof BrokerError && e.status === 400 && /too long/.test(e.message));
    assert.equal(broker.bodies.length, 4);
  } finally {
    await client.close();
  }
});

test('an older transfer server refuses `have` in a fetch: the chunks are fetched whole, and `have` is not sent again', async () => {
  const id = 'ab'.repeat(32);
  const blob = randomBytes(100);
  const server = await olderServer('/v1/chunks/fetch', 'have', () => Buffer.concat([blobFrame(id, blob), endFrame()]));
  const session = new TransferSession({ url: server.url, fingerprint: tls.fingerprint, ticket: 't', maxStreams: 1 });
  try {
    const fetchOnce = async () => {
      const got: [string, boolean | string][] = [];
      for await (const f of fetchBlobs(session, [id], undefined, ['cd'.repeat(32)])) got.push([f.id, f.delta]);
      return got;
    };
    assert.deepEqual(await fetchOnce(), [[id, false]]);
    assert.equal(session.refusesBases, true);
    assert.deepEqual(await fetchOnce(), [[id, false]]);
    assert.deepEqual(server.bodies.map((b) => 'have' in b), [true, false, false], 'asked once with `have`, then never again');
  } finally {
    await session.close();
  }
});
