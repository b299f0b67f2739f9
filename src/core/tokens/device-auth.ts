import { createHash, randomBytes, type KeyObject } from 'node:crypto';
import { signBytes, verifyBytes } from '../signing.js';

/**
 * Agent requests are signed by the device key over method, path, time, a fresh nonce and the
 * body hash. The broker accepts each nonce once within the time window, so a captured request
 * cannot be replayed.
 */
export const DEVICE_HEADER = 'x-carryon-device';
export const TIME_HEADER = 'x-carryon-time';
export const NONCE_HEADER = 'x-carryon-nonce';
export const SIGNATURE_HEADER = 'x-carryon-signature';
export const MAX_SKEW_MS = 5 * 60 * 1000;
const NONCE_RE = /^[A-Za-z0-9_-]{16,64}$/;

export function canonicalRequest(method: string, path: string, time: string, body: Uint8Array | string, nonce = ''): string {
  const hash = createHash('sha256').update(body).digest('hex');
  return `${method.toUpperCase()}\n${path}\n${time}\n${nonce}\n${hash}`;
}

export function signDeviceRequest(
  privateKey: KeyObject,
  deviceId: string,
  method: string,
  path: string,
  body: Uint8Array | string,
  now = new Date(),
): Record<string, string> {
  const time = now.toISOString();
  const nonce = randomBytes(18).toString('base64url');
  return {
    [DEVICE_HEADER]: deviceId,
    [TIME_HEADER]: time,
    [NONCE_HEADER]: nonce,
    [SIGNATURE_HEADER]: signBytes(privateKey, Buffer.from(canonicalRequest(method, path, time, body, nonce))),
  };
}

export type DeviceAuthFailure = 'missing' | 'skew' | 'signature' | 'replay' | 'revoked';

/** Returns null when valid, else why not. The caller looks up the device's public key first. */
export function checkDeviceSignature(
  publicKey: KeyObject,
  method: string,
  path: string,
  time: string | undefined,
  signature: string | undefined,
  body: Uint8Array | string,
  now = new Date(),
  nonce?: string,
): DeviceAuthFailure | null {
  if (!time || !signature || !nonce || !NONCE_RE.test(nonce)) return 'missing';
  const t = Date.parse(time);
  if (!Number.isFinite(t) || Math.abs(now.getTime() - t) > MAX_SKEW_MS) return 'skew';
  return verifyBytes(publicKey, Buffer.from(canonicalRequest(method, path, time, body, nonce)), signature) ? null : 'signature';
}
