import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { test } from 'node:test';
import Fastify, { type FastifyInstance } from 'fastify';
import type { AuditEntry, BrokerContext } from '../../src/broker/context.js';
import { installHttpBasics } from '../../src/broker/http.js';
import { issueToken } from '../../src/broker/auth/tokens.js';
import { adminScope, guardAdminRoutes } from '../../src/broker/routes/admin/admin-scope.js';
import { consoleRoutes } from '../../src/broker/routes/console.js';
import { transferRoutes } from '../../src/broker/routes/transfers.js';

// carryon-test: sqlite-only (no database: the plugins run on a bare fastify with a stub context).
// In process, no broker started: the admin scope is a plugin whose onRequest hook needs only the
// session key, the users and the audit of the context.
const tokenKey = randomBytes(32);
const users: Record<string, 'admin' | 'user'> = { root: 'admin', alice: 'user' };
const audited: AuditEntry[] = [];
const ctx = {
  secrets: { tokenKey },
  settings: { transferSecret: 'the-transfer-secret' },
  meta: {
    getUser: async (name: string) => (users[name] ? { name, role: users[name], disabled: false } : null),
    deviceRevokedAt: async () => null,
  },
  audit: async (e: AuditEntry) => void audited.push(e),
} as unknown as BrokerContext; // only what requireAdmin reads
const bearer = (sub: string) => ({ authorization: `Bearer ${issueToken(tokenKey, { sub, role: users[sub]!, exp: Math.floor(Date.now() / 1000) + 600 })}` });

async function broker(register: (app: FastifyInstance) => Promise<void>): Promise<FastifyInstance> {
  const app = Fastify();
  await installHttpBasics(app);
  guardAdminRoutes(app);
  await register(app);
  await app.ready();
  return app;
}

test('a route added to the admin scope with no check of its own is still refused to a non-admin (403) and to nobody (401), before its handler runs', async () => {
  let ran = 0;
  // A resource plugin whose handler forgets every check.
  const forgetful = async (a: FastifyInstance) => {
    a.post('/v1/admin/forgetful', async () => ({ ran: ++ran }));
  };
  const app = await broker(async (a) => void (await a.register(adminScope, { ctx, resources: async (admin) => void (await admin.register(forgetful)) })));
  try {
    const anonymous = await app.inject({ method: 'POST', url: '/v1/admin/forgetful', payload: {} });
    assert.equal(anonymous.statusCode, 401);
    const user = await app.inject({ method: 'POST', url: '/v1/admin/forgetful', headers: bearer('alice'), payload: {} });
    assert.equal(user.statusCode, 403);
    assert.equal(user.json().error, 'forbidden');
    assert.equal(ran, 0);
    assert.ok(audited.some((e) => e.actor === 'alice' && e.action === 'admin-access' && e.outcome === 'denied'));
    const admin = await app.inject({ method: 'POST', url: '/v1/admin/forgetful', headers: bearer('root'), payload: {} });
    assert.equal(admin.statusCode, 200);
    assert.deepEqual(admin.json(), { ran: 1 });
  } finally {
    await app.close();
  }
});

test('a /v1/admin route outside the admin scope stops the broker from starting; a non-admin route inside it too', async () => {
  await assert.rejects(broker(async (a) => void a.get('/v1/admin/loose', async () => ({}))), /outside the admin scope/);
  await assert.rejects(
    broker(async (a) => void (await a.register(adminScope, { ctx, resources: async (admin) => void admin.get('/v1/desktops', async () => ({})) }))),
    /not under \/v1\/admin/,
  );
});

test('the console plugin serves pages only: it registers no API route', async () => {
  const urls: string[] = [];
  const app = Fastify();
  app.addHook('onRoute', (r) => void urls.push(r.url));
  await app.register(consoleRoutes, {});
  await app.ready();
  await app.close();
  assert.ok(urls.includes('/'));
  assert.deepEqual(urls.filter((u) => u.startsWith('/v1')), []);
});

test('a transfer server route is refused without the secret before its body is read (401, not a parse error)', async () => {
  const app = await broker(async (a) => void (await a.register(transferRoutes, { ctx })));
  try {
    for (const url of ['/v1/transfer-servers/register', '/v1/transfer-servers/t1/heartbeat']) {
      const wrong = await app.inject({ method: 'POST', url, headers: { 'x-carryon-transfer-secret': 'guess', 'content-type': 'application/json' }, payload: '{not json' });
      assert.equal(wrong.statusCode, 401, url);
      assert.equal(wrong.json().error, 'bad-secret');
    }
    const right = await app.inject({ method: 'POST', url: '/v1/transfer-servers/register', headers: { 'x-carryon-transfer-secret': 'the-transfer-secret', 'content-type': 'application/json' }, payload: '{not json' });
    assert.equal(right.statusCode, 400);
  } finally {
    await app.close();
  }
});
