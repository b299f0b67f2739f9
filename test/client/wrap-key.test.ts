import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { test } from 'node:test';
import { MIN_SCRYPT_N, reusableWrapKey } from '../../src/client/vault/kdf.js';

// One KDF per command (kdf.ts): a wrap key already derived seals a second wrap only at today's cost.
const held = (N: number) => ({ salt: randomBytes(16), N, key: randomBytes(32) });

test('a derived wrap key is reused only at the cost a new wrap gets, never a lowered one carried over', () => {
  const prod = {} as NodeJS.ProcessEnv;
  assert.ok(reusableWrapKey(held(MIN_SCRYPT_N), prod));
  assert.ok(reusableWrapKey(held(MIN_SCRYPT_N * 2), prod));
  // A vault a test made (or one planted) at a lowered cost: a fresh key is derived instead.
  assert.equal(reusableWrapKey(held(16384), prod), null);
  // Asked for a higher cost than the held key's: derived anew at that cost.
  assert.equal(reusableWrapKey(held(MIN_SCRYPT_N), { CARRYON_SCRYPT_N: String(MIN_SCRYPT_N * 2) } as NodeJS.ProcessEnv), null);
  assert.equal(reusableWrapKey(null, prod), null);
  // Tests lower the cost on purpose: their keys are reused at that cost.
  assert.ok(reusableWrapKey(held(16384), { NODE_ENV: 'test', CARRYON_SCRYPT_N: '16384' } as NodeJS.ProcessEnv));
});
