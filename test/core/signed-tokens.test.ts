import assert from 'node:assert/strict';
import { test } from 'node:test';
import { checkDeviceSignature, NONCE_HEADER, signDeviceRequest, SIGNATURE_HEADER, TIME_HEADER } from '../../src/core/tokens/device-auth.js';
import { signLease, verifyLease, type LeasePayload } from '../../src/core/tokens/lease.js';
import { policyHash, resolvePolicy } from '../../src/core/policy.js';
import { generateSigningKey } from '../../src/core/signing.js';
import { signTicket, verifyTicket, type TicketPayload } from '../../src/core/tokens/ticket.js';

const broker = generateSigningKey();
const other = generateSigningKey();
const now = new Date('2026-06-01T12:00:00Z');

const lease: LeasePayload = {
  v: 1,
  user: 'alice',
  deviceId: 'dev1',
  desktops: ['d1'],
  deadline: '2026-06-02T12:00:00.000Z',
  issuedAt: now.toISOString(),
  policyHash: 'a'.repeat(64),
};

test('lease verifies, and refuses forgery, other device, other desktop, expiry', () => {
  const signed = signLease(lease, broker.privateKey);
  assert.equal(verifyLease(signed, broker.publicKey, { now, deviceId: 'dev1', desktopId: 'd1' }).user, 'alice');
  assert.throws(() => verifyLease(signed, other.publicKey, { now, deviceId: 'dev1' }), { code: 'lease-signature' });
  const tampered = { ...signed, payload: Buffer.from(JSON.stringify({ ...lease, deadline: '2099-01-01T00:00:00.000Z' })).toString('base64') };
  assert.throws(() => verifyLease(tampered, broker.publicKey, { now, deviceId: 'dev1' }), { code: 'lease-signature' });
  assert.throws(() => verifyLease(signed, broker.publicKey, { now, deviceId: 'dev2' }), { code: 'lease-wrong-device' });
  assert.throws(() => verifyLease(signed, broker.publicKey, { now, deviceId: 'dev1', desktopId: 'd9' }), { code: 'lease-not-covered' });
  assert.throws(() => verifyLease(signed, broker.publicKey, { now: new Date('2026-06-03T00:00:00Z'), deviceId: 'dev1' }), { code: 'lease-expired' });
  assert.throws(() => verifyLease({ payload: 1 }, broker.publicKey, { now, deviceId: 'dev1' }), { code: 'lease-malformed' });
});

test('ticket verifies, and refuses forgery, expiry and another server', () => {
  const payload: TicketPayload = {
    v: 1, jobId: 'j', desktopId: 'd', checkoutId: 'c', direction: 'download', manifests: ['b'.repeat(64)],
    wrappedKeys: 'AAAA', keyContext: 'lineage:x', transferServerId: 'ts1', maxStreams: 4, expiresAt: '2026-06-01T12:10:00.000Z',
  };
  const t = signTicket(payload, broker.privateKey);
  assert.equal(verifyTicket(t, broker.publicKey, { now, serverId: 'ts1' }).jobId, 'j');
  assert.throws(() => verifyTicket(t, other.publicKey, { now, serverId: 'ts1' }), { code: 'ticket-signature' });
  assert.throws(() => verifyTicket(t, broker.publicKey, { now, serverId: 'ts2' }), { code: 'ticket-wrong-server' });
  assert.throws(() => verifyTicket(t, broker.publicKey, { now: new Date('2026-06-01T13:00:00Z'), serverId: 'ts1' }), { code: 'ticket-expired' });
  assert.throws(() => verifyTicket('garbage', broker.publicKey, { now, serverId: 'ts1' }), { code: 'ticket-malformed' });
  const [body, sig] = t.split('.');
  const forged = Buffer.from(JSON.stringify({ ...payload, direction: 'upload' })).toString('base64url');
  assert.throws(() => verifyTicket(`${forged}.${sig}`, broker.publicKey, { now, serverId: 'ts1' }), { code: 'ticket-signature' });
  assert.ok(body);
});

test('device signatures bind method, path, time, nonce and body', () => {
  const dev = generateSigningKey();
  const h = signDeviceRequest(dev.privateKey, 'dev1', 'POST', '/v1/agent/heartbeat', '{"a":1}', now);
  const n = h[NONCE_HEADER];
  assert.equal(checkDeviceSignature(dev.publicKey, 'POST', '/v1/agent/heartbeat', h[TIME_HEADER], h[SIGNATURE_HEADER], '{"a":1}', now, 'A'.repeat(24)), 'signature', 'nonce is signed');
  assert.equal(checkDeviceSignature(dev.publicKey, 'POST', '/v1/agent/heartbeat', h[TIME_HEADER], h[SIGNATURE_HEADER], '{"a":1}', now), 'missing', 'nonce is required');
  assert.equal(checkDeviceSignature(dev.publicKey, 'POST', '/v1/agent/heartbeat', h[TIME_HEADER], h[SIGNATURE_HEADER], '{"a":1}', now, n), null);
  assert.equal(checkDeviceSignature(dev.publicKey, 'POST', '/v1/agent/heartbeat', h[TIME_HEADER], h[SIGNATURE_HEADER], '{"a":2}', now, n), 'signature');
  assert.equal(checkDeviceSignature(dev.publicKey, 'POST', '/v1/other', h[TIME_HEADER], h[SIGNATURE_HEADER], '{"a":1}', now, n), 'signature');
  assert.equal(checkDeviceSignature(other.publicKey, 'POST', '/v1/agent/heartbeat', h[TIME_HEADER], h[SIGNATURE_HEADER], '{"a":1}', now, n), 'signature');
  const later = new Date(now.getTime() + 10 * 60 * 1000);
  assert.equal(checkDeviceSignature(dev.publicKey, 'POST', '/v1/agent/heartbeat', h[TIME_HEADER], h[SIGNATURE_HEADER], '{"a":1}', later, n), 'skew');
  assert.equal(checkDeviceSignature(dev.publicKey, 'POST', '/x', undefined, undefined, '', now), 'missing');
});

test('policy resolves global → pool → desktop → user with sources; hash ignores sources', () => {
  const r = resolvePolicy({
    global: { maxLeaseHours: 48, usbAllowed: true },
    pool: { id: 'p1', values: { maxLeaseHours: 24 } },
    desktop: { id: 'd1', values: { rollbackAllowed: false } },
    user: { name: 'alice', values: { maxLeaseHours: 72 } },
  });
  assert.deepEqual(r.maxLeaseHours, { value: 72, source: 'user:alice' });
  assert.deepEqual(r.usbAllowed, { value: true, source: 'global' });
  assert.deepEqual(r.rollbackAllowed, { value: false, source: 'desktop:d1' });
  assert.deepEqual(r.checkinAllowed, { value: true, source: 'default' });
  const same = resolvePolicy({ global: { maxLeaseHours: 72, usbAllowed: true, rollbackAllowed: false } });
  assert.equal(policyHash(r), policyHash(same));
  assert.notEqual(policyHash(r), policyHash(resolvePolicy({})));
});
