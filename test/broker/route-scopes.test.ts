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
import { userOf, userScope } from '../../src/broker/routes/user/user-scope.js';
import { heldCheckout, holderAction, holderScope } from '../../src/broker/routes/user/holder-scope.js';
import { desktopAction, desktopScope, entitledDesktop } from '../../src/broker/routes/user/desktop-scope.js';
import { agentScope, deviceOf } from '../../src/broker/routes/agent/agent-scope.js';
import { guardScopedRoutes } from '../../src/broker/routes/scopes.js';
import { makeCredential } from '../../src/broker/hosts/credentials.js';
import { displayHostRoutes } from '../../src/broker/routes/display.js';
import { generateSigningKey, publicKeyToBase64 } from '../../src/core/signing.js';
import { signDeviceRequest } from '../../src/core/tokens/device-auth.js';

// carryon-test: sqlite-only (no database: the plugins run on a bare fastify with a stub context).
// In process, no broker started: the admin scope is a plugin whose onRequest hook needs only the
// session key, the users and the audit of the context.
const tokenKey = randomBytes(32);
const users: Record<string, 'admin' | 'user'> = { root: 'admin', alice: 'user' };
const audited: AuditEntry[] = [];
// One enrolled device (alice's) and one revoked (for the agent scope).
const laptop = generateSigningKey();
const devices: Record<string, { id: string; user: string; publicKey: string }> = {
  'dev-1': { id: 'dev-1', user: 'alice', publicKey: publicKeyToBase64(laptop.publicKey) },
  'dev-revoked': { id: 'dev-revoked', user: 'alice', publicKey: publicKeyToBase64(laptop.publicKey) },
};
const nonces = new Set<string>();
const ctx = {
  secrets: { tokenKey },
  settings: { transferSecret: 'the-transfer-secret' },
  meta: {
    getUser: async (name: string) => (users[name] ? { name, role: users[name], disabled: false } : null),
    deviceRevokedAt: async (id: string) => (id === 'dev-revoked' ? new Date().toISOString() : null),
    getDevice: async (id: string) => devices[id] ?? null,
    acceptNonce: async (id: string, nonce: string) => !nonces.has(`${id}/${nonce}`) && Boolean(nonces.add(`${id}/${nonce}`)),
    // One desktop, d-1 ("mine"), that alice is entitled to.
    getDesktop: async (ref: string) => (ref === 'd-1' || ref === 'mine' ? { id: 'd-1', name: 'mine' } : ref === 'd-2' ? { id: 'd-2', name: 'theirs' } : null),
    isEntitled: async (user: string, d: { id: string }) => user === 'alice' && d.id === 'd-1',
    getCheckout: async (id: string) => (id === 'co-alice' ? { id, user: 'alice', desktopId: 'd-1', deviceId: 'dev-1', state: 'checked_out' } : null),
  },
  audit: async (e: AuditEntry) => void audited.push(e),
} as unknown as BrokerContext; // only what requireAdmin, requireUser and requireDevice read
const bearer = (sub: string) => ({ authorization: `Bearer ${issueToken(tokenKey, { sub, role: users[sub]!, exp: Math.floor(Date.now() / 1000) + 600 })}` });

async function broker(register: (app: FastifyInstance) => Promise<void>): Promise<FastifyInstance> {
  const app = Fastify();
  await installHttpBasics(app);
  guardAdminRoutes(app);
  guardScopedRoutes(app);
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

test('a route added to the user scope with no check of its own is refused without a session (401) before its body is read; with one it gets the user', async () => {
  let ran = 0;
  const forgetful = async (a: FastifyInstance) => {
    a.post('/v1/forgetful', async (req) => ({ ran: ++ran, user: userOf(req).sub }));
  };
  const app = await broker(async (a) => void (await a.register(userScope, { ctx, resources: async (user) => void (await user.register(forgetful)) })));
  try {
    for (const headers of [{}, { authorization: 'Bearer not-a-token' }, bearer('mallory')]) {
      // A malformed body too: refused for the missing session, not parsed (401, not 400).
      const anonymous = await app.inject({ method: 'POST', url: '/v1/forgetful', headers: { ...headers, 'content-type': 'application/json' }, payload: '{not json' });
      assert.deepEqual([anonymous.statusCode, anonymous.json().error], [401, 'unauthenticated'], JSON.stringify(headers));
    }
    assert.equal(ran, 0);
    const alice = await app.inject({ method: 'POST', url: '/v1/forgetful', headers: bearer('alice'), payload: {} });
    assert.deepEqual([alice.statusCode, alice.json()], [200, { ran: 1, user: 'alice' }]);
  } finally {
    await app.close();
  }
});

test('a /v1 route registered in no scope (user, admin, agent, machine or open) stops the broker from starting', async () => {
  await assert.rejects(broker(async (a) => void a.get('/v1/desktops/loose', async () => ({}))), /in no scope/);
  await assert.rejects(broker(async (a) => void (await a.register(async (p) => void p.post('/v1/agent/loose', async () => ({}))))), /in no scope/);
});

test('a route added to the agent scope with no check of its own runs only for a valid device signature over its body', async () => {
  let ran = 0;
  const forgetful = async (a: FastifyInstance) => {
    a.post('/v1/agent/forgetful', async (req) => ({ ran: ++ran, device: deviceOf(req).id }));
    a.post('/v1/agent/forgetful-revoked', { config: { revokedDeviceAllowed: true } }, async (req) => ({ ran: ++ran, revoked: deviceOf(req).revoked }));
  };
  const app = await broker(async (a) => void (await a.register(agentScope, { ctx, resources: async (agent) => void (await agent.register(forgetful)) })));
  const signed = (device: string, url: string, body: string, signedBody = body) =>
    app.inject({ method: 'POST', url, headers: { ...signDeviceRequest(laptop.privateKey, device, 'POST', url, signedBody), 'content-type': 'application/json' }, payload: body });
  try {
    const unsigned = await app.inject({ method: 'POST', url: '/v1/agent/forgetful', payload: {} });
    assert.deepEqual([unsigned.statusCode, unsigned.json().error], [401, 'device-unknown']);
    // The signature covers the body: another body under the same signature is refused.
    const swapped = await signed('dev-1', '/v1/agent/forgetful', '{"a":2}', '{"a":1}');
    assert.deepEqual([swapped.statusCode, swapped.json().error], [401, 'device-signature']);
    const revoked = await signed('dev-revoked', '/v1/agent/forgetful', '{}');
    assert.deepEqual([revoked.statusCode, revoked.json().error], [403, 'device-revoked']);
    assert.equal(ran, 0);
    const ok = await signed('dev-1', '/v1/agent/forgetful', '{"a":1}');
    assert.deepEqual([ok.statusCode, ok.json()], [200, { ran: 1, device: 'dev-1' }]);
    // Only where the route says so does a revoked device get through (its heartbeat, its acks).
    const allowed = await signed('dev-revoked', '/v1/agent/forgetful-revoked', '{}');
    assert.deepEqual([allowed.statusCode, allowed.json()], [200, { ran: 2, revoked: true }]);
  } finally {
    await app.close();
  }
});

test('the display relay\'s host routes are refused without the host\'s credential before the body is read (401, audited under the route\'s action)', async () => {
  // The relay hears of queued commands through the host store; no host is ever found here.
  const h1 = makeCredential('h1');
  const hostCtx = { ...ctx, hosts: { onQueued: () => undefined, host: async () => null, keyHash: async (id: string) => (id === 'h1' ? h1.hash : null) } } as unknown as BrokerContext;
  const app = await broker(async (a) => void (await a.register(displayHostRoutes, { ctx: hostCtx })));
  try {
    const wrong = await app.inject({ method: 'POST', url: '/v1/hosts/h1/commands/wait', headers: { 'x-carryon-host-secret': 'guess', 'content-type': 'application/json' }, payload: '{not json' });
    assert.deepEqual([wrong.statusCode, wrong.json().error], [401, 'bad-secret']);
    assert.ok(audited.some((e) => e.action === 'host-wait' && e.outcome === 'denied'));
    const right = await app.inject({ method: 'POST', url: '/v1/hosts/h1/commands/wait', headers: { 'x-carryon-host-secret': h1.credential, 'content-type': 'application/json' }, payload: '{not json' });
    assert.deepEqual([right.statusCode, right.json().error], [400, 'malformed-json']);
  } finally {
    await app.close();
  }
});

test('a route added to the holder scope with no check of its own is refused for a check-out the caller does not hold (403, audited) or that does not exist (404), before its handler runs; a route naming no check-out cannot join it', async () => {
  let ran = 0;
  const forgetful = async (a: FastifyInstance) => {
    a.post('/v1/checkouts/:id/forgetful', async (req) => ({ ran: ++ran, checkout: heldCheckout(req).id }));
  };
  const held = (resources: (h: FastifyInstance) => Promise<void>) => async (a: FastifyInstance) =>
    void (await a.register(userScope, { ctx, resources: async (u) => void (await u.register(holderScope, { ctx, resources })) }));
  users.bob = 'user';
  const app = await broker(held(async (h) => void (await h.register(forgetful))));
  try {
    const bob = await app.inject({ method: 'POST', url: '/v1/checkouts/co-alice/forgetful', headers: bearer('bob'), payload: {} });
    assert.equal(bob.statusCode, 403);
    assert.equal(bob.json().error, 'not-holder');
    assert.ok(audited.some((e) => e.actor === 'bob' && e.action === 'forgetful' && e.outcome === 'denied'), 'the refusal is audited');
    assert.equal((await app.inject({ method: 'POST', url: '/v1/checkouts/co-nobody/forgetful', headers: bearer('alice'), payload: {} })).statusCode, 404);
    assert.equal((await app.inject({ method: 'POST', url: '/v1/checkouts/co-alice/forgetful', payload: {} })).statusCode, 401);
    assert.equal(ran, 0);
    const alice = await app.inject({ method: 'POST', url: '/v1/checkouts/co-alice/forgetful', headers: bearer('alice'), payload: {} });
    assert.equal(alice.statusCode, 200);
    assert.deepEqual(alice.json(), { ran: 1, checkout: 'co-alice' });
  } finally {
    await app.close();
    delete users.bob;
  }
  await assert.rejects(broker(held(async (h) => void h.get('/v1/desktops/:id/power', async () => ({})))), /names no check-out/);
  assert.deepEqual(['/v1/checkouts/:id', '/v1/checkouts/:id/transferred', '/v1/checkouts/:id/checkin/commit', '/v1/checkouts/:id/lease'].map(holderAction), ['checkout-outcome', 'transfer-end', 'checkin-commit', 'lease-renew']);
});

test('a route added to the desktop scope with no check of its own is refused for a desktop the caller is not entitled to or that does not exist (403, the same answer, audited), before its handler runs; admins only where the route says so', async () => {
  let ran = 0;
  const forgetful = async (a: FastifyInstance) => {
    a.post('/v1/desktops/:id/forgetful', async (req) => ({ ran: ++ran, desktop: entitledDesktop(req).id }));
    a.get('/v1/desktops/:id/for-admins-too', { config: { adminsToo: true } }, async (req) => ({ desktop: entitledDesktop(req).id }));
  };
  const scoped = (resources: (h: FastifyInstance) => Promise<void>) => async (a: FastifyInstance) =>
    void (await a.register(userScope, { ctx, resources: async (u) => void (await u.register(desktopScope, { ctx, resources })) }));
  const app = await broker(scoped(async (h) => void (await h.register(forgetful))));
  try {
    for (const ref of ['d-2', 'nowhere']) {
      const other = await app.inject({ method: 'POST', url: `/v1/desktops/${ref}/forgetful`, headers: bearer('alice'), payload: {} });
      assert.deepEqual([other.statusCode, other.json().error], [403, 'not-entitled'], ref);
    }
    assert.ok(audited.some((e) => e.actor === 'alice' && e.action === 'forgetful' && e.outcome === 'denied' && e.desktopId === 'd-2'), 'the refusal is audited');
    assert.equal((await app.inject({ method: 'POST', url: '/v1/desktops/d-1/forgetful', payload: {} })).statusCode, 401);
    assert.equal((await app.inject({ method: 'POST', url: '/v1/desktops/d-1/forgetful', headers: bearer('root'), payload: {} })).statusCode, 403, 'an admin is not entitled by role');
    assert.equal(ran, 0);
    const alice = await app.inject({ method: 'POST', url: '/v1/desktops/mine/forgetful', headers: bearer('alice'), payload: {} });
    assert.deepEqual([alice.statusCode, alice.json()], [200, { ran: 1, desktop: 'd-1' }]);
    const admin = await app.inject({ method: 'GET', url: '/v1/desktops/d-2/for-admins-too', headers: bearer('root') });
    assert.deepEqual([admin.statusCode, admin.json()], [200, { desktop: 'd-2' }]);
    assert.equal((await app.inject({ method: 'GET', url: '/v1/desktops/d-2/for-admins-too', headers: bearer('alice') })).statusCode, 403);
  } finally {
    await app.close();
  }
  await assert.rejects(broker(scoped(async (h) => void h.get('/v1/checkouts/:id/power', async () => ({})))), /names no desktop/);
  assert.deepEqual(['/v1/desktops/:id/start', '/v1/desktops/:id/display-ticket', '/v1/desktops/:id/checkout', '/v1/desktops/:id/restore-points'].map(desktopAction), ['power-on', 'display-open', 'checkout', 'restore-points']);
});
