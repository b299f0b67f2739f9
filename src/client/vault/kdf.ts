import { randomBytes } from 'node:crypto';
import { CarryonError } from '../../core/errors.js';
import { deriveDeviceUserKey } from '../../core/keys.js';

/** Minimum scrypt cost for a vault key in production: 2^17 (≈ 0.6 s and 128 MiB a guess). */
export const MIN_SCRYPT_N = 1 << 17;

/** A lowered cost is honoured only where the process says it is a test (never by default). */
export function insecureTestKdfAllowed(env: NodeJS.ProcessEnv = process.env): boolean {
  return env.NODE_ENV === 'test' || env.CARRYON_INSECURE_TEST_KDF === '1';
}

/** scrypt N for new wraps: MIN_SCRYPT_N, higher on request; lower only in tests, else refused. */
export function vaultScryptN(env: NodeJS.ProcessEnv = process.env): number {
  if (env.CARRYON_SCRYPT_N === undefined) return MIN_SCRYPT_N;
  const n = Number(env.CARRYON_SCRYPT_N);
  if (!Number.isInteger(n) || n < 1024 || (n & (n - 1)) !== 0) throw new CarryonError('kdf-refused', `CARRYON_SCRYPT_N=${env.CARRYON_SCRYPT_N} is not a power of two ≥ 1024`);
  if (n < MIN_SCRYPT_N && !insecureTestKdfAllowed(env)) {
    throw new CarryonError('kdf-refused', `CARRYON_SCRYPT_N=${n} lowers the vault key cost below ${MIN_SCRYPT_N} (2^17); it is honoured only in tests (NODE_ENV=test or CARRYON_INSECURE_TEST_KDF=1): unset it`);
  }
  return n;
}

/** Refuses to open a wrap whose stored cost is below the minimum (a planted or test-made vault). */
export function checkStoredCost(n: number, what: string, env: NodeJS.ProcessEnv = process.env): void {
  if (n < MIN_SCRYPT_N && !insecureTestKdfAllowed(env)) {
    throw new CarryonError('kdf-refused', `${what} was wrapped with scrypt N=${n}, below the minimum ${MIN_SCRYPT_N} (2^17): refusing to open it (a lowered cost is accepted only in tests)`);
  }
}

/** scrypt needs 128·N·r bytes; room for that and a little more. */
export function scryptMaxmem(n: number): number {
  return 128 * n * 8 * 2;
}

/**
 * scrypt(device secret ‖ password, salt) as one wrap used it. A command that opens one wrap and
 * seals another for the same device and password (a check-in parking its base, a check-out
 * taking over a parked copy) seals the second under the same key and salt, each with its own
 * random nonce and an AAD naming what it holds: one KDF per command instead of two, and no
 * weaker, since both wraps fall to the same password guess either way.
 */
export interface WrapKey { salt: Buffer; N: number; key: Buffer }

export async function deriveWrapKey(device: { secret(password: string): Promise<Buffer> }, password: string, salt: Buffer, N: number): Promise<WrapKey> {
  return { salt, N, key: await deriveDeviceUserKey(await device.secret(password), password, salt, { N, r: 8, p: 1, maxmem: scryptMaxmem(N) }) };
}

/** `held` when its cost is what a new wrap gets (never a lowered one carried over), else null. */
export function reusableWrapKey(held: WrapKey | null | undefined, env: NodeJS.ProcessEnv = process.env): WrapKey | null {
  return held && held.N >= vaultScryptN(env) ? held : null;
}

/**
 * A wrap key being derived: its salt and cost are known at once (the state keeps them, the layers'
 * secrets derive from the salt), the key itself a moment later. A check-out starts it before it
 * asks the broker and awaits it only once the desktop is local, so the KDF runs beside the
 * transfer instead of before it (the online wrap opens the vault meanwhile).
 */
export interface PendingWrapKey { salt: string; N: number; key: Promise<WrapKey> }

/** A fresh salt at today's cost; `salt`/`N`: those a state already names (a resumed check-out's). */
export function startWrapKey(device: { secret(password: string): Promise<Buffer> }, password: () => Promise<string>, at?: { salt: string; N: number }): PendingWrapKey {
  const salt = at ? Buffer.from(at.salt, 'base64') : randomBytes(16);
  const N = at?.N ?? vaultScryptN();
  const key = (async () => deriveWrapKey(device, await password(), salt, N))();
  key.catch(() => undefined); // awaited (and reported) by whoever finishes the wrap
  return { salt: salt.toString('base64'), N, key };
}
