import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { test } from 'node:test';
import type { BrokerContext } from '../../src/broker/context.js';
import type { CheckoutRow } from '../../src/broker/db/metadata.js';
import { parkedUnlockShare, releaseUnlockShare, unlockShare, UNLOCK_LOGIN_MAX_AGE_SEC } from '../../src/broker/online-unlock.js';

const masterKey = randomBytes(32);
const row = (over: Partial<CheckoutRow> = {}): CheckoutRow => ({
  id: 'c1', desktopId: 'd1', user: 'alice', deviceId: 'dev1', checkpointSnapshot: 's1', state: 'checked_out', leaseExpiresAt: '', jobId: null,
  pendingDisks: null, lastHeartbeat: null, createdAt: '', updatedAt: '', ...over,
});

/** The parts of the broker the release reads: the master key, revocations, the audit. */
function fakeCtx(revoked: string[] = []) {
  const audit: { action: string; outcome: string; detail?: string }[] = [];
  const ctx = {
    secrets: { masterKey },
    meta: { deviceRevokedAt: async (id: string) => (revoked.includes(id) ? '2026-12-01T00:00:00Z' : null) },
    audit: async (e: { action: string; outcome: string; detail?: string }) => void audit.push(e),
  } as unknown as BrokerContext;
  return { ctx, audit };
}

const now = () => Math.floor(Date.now() / 1000);
const fresh = { sub: 'alice', role: 'user' as const, exp: now() + 600, iat: now(), dev: 'dev1' };

test('the unlock share: the same on every broker with the master key, its own per check-out, device and user', () => {
  const share = unlockShare(masterKey, row());
  assert.equal(Buffer.from(share, 'base64').length, 32);
  assert.equal(unlockShare(Buffer.from(masterKey), row()), share);
  for (const other of [row({ id: 'c2' }), row({ deviceId: 'dev2' }), row({ user: 'bob' })]) assert.notEqual(unlockShare(masterKey, other), share);
  assert.notEqual(unlockShare(randomBytes(32), row()), share);
});

test('the share goes only to a session opened by a password check on the check-out\'s device just now, while the check-out is open and the device not revoked; each refusal audited', async () => {
  const { ctx, audit } = fakeCtx();
  assert.deepEqual(await releaseUnlockShare(ctx, fresh, row()), { share: unlockShare(masterKey, row()) });
  for (const state of ['transferring', 'checking_in'] as const) assert.ok((await releaseUnlockShare(ctx, fresh, row({ state }))).share);
  const refused = async (claims: typeof fresh | Omit<typeof fresh, 'dev' | 'iat'>, c: CheckoutRow, code: string, using = ctx) =>
    assert.rejects(releaseUnlockShare(using, claims, c), (e: Error & { code?: string }) => e.code === code);
  await refused(fresh, row({ state: 'checked_in' }), 'wrong-state');
  await refused(fresh, row({ state: 'cancelled' }), 'wrong-state');
  await refused({ ...fresh, dev: 'dev2' }, row(), 'wrong-device');
  await refused({ sub: 'alice', role: 'user', exp: fresh.exp }, row(), 'wrong-device');
  await refused({ ...fresh, iat: now() - UNLOCK_LOGIN_MAX_AGE_SEC - 5 }, row(), 'reauth-required');
  await refused(fresh, row(), 'device-revoked', fakeCtx(['dev1']).ctx);
  assert.deepEqual(audit.map((a) => [a.action, a.outcome]), Array(5).fill(['online-unlock', 'denied']));
});

test('a parked copy\'s share: the ended check-out\'s own, given with a new check-out of that desktop by the same user on the same device; else none, the mismatch audited', async () => {
  const rows = new Map<string, CheckoutRow>([
    ['ended', row({ id: 'ended', state: 'checked_in' })],
    ['cancelled', row({ id: 'cancelled', state: 'cancelled' })],
    ['open', row({ id: 'open', state: 'checked_out' })],
    ['bobs', row({ id: 'bobs', user: 'bob', state: 'checked_in' })],
    ['other-device', row({ id: 'other-device', deviceId: 'dev2', state: 'checked_in' })],
    ['other-desktop', row({ id: 'other-desktop', desktopId: 'd2', state: 'checked_in' })],
  ]);
  const { ctx, audit } = fakeCtx();
  (ctx.meta as unknown as { getCheckout: (id: string) => Promise<CheckoutRow | null> }).getCheckout = async (id) => rows.get(id) ?? null;
  const next = { desktopId: 'd1', deviceId: 'dev1' };
  assert.equal(await parkedUnlockShare(ctx, 'alice', next, 'ended'), unlockShare(masterKey, rows.get('ended')!));
  assert.equal(await parkedUnlockShare(ctx, 'alice', next, 'cancelled'), unlockShare(masterKey, rows.get('cancelled')!));
  for (const id of ['open', 'bobs', 'other-device', 'other-desktop']) assert.equal(await parkedUnlockShare(ctx, 'alice', next, id), undefined, id);
  assert.equal(await parkedUnlockShare(ctx, 'alice', next, 'no-such'), undefined, 'an unknown check-out: none');
  assert.deepEqual(audit.map((a) => [a.action, a.outcome]), Array(4).fill(['online-unlock', 'denied']));
  assert.match(audit[0]!.detail!, /parked copy of checkout open: that check-out is still checked_out/);
});
