import { createHash, type KeyObject } from 'node:crypto';
import { signBytes, verifyBytes } from './signing.js';

/** Agent requests are signed by the device key over method, path, time and body hash. */
export const DEVICE_HEADER = 'x-carryon-device';
export const TIME_HEADER = 'x-carryon-time';
export const SIGNATURE_HEADER = 'x-carryon-signature';
export const MAX_SKEW_MS = 5 * 60 * 1000;

export function canonicalRequest(method: string, path: string, time: string, body: Uint8Array | string): string {
  const hash = createHash('sha256').update(body).digest('hex');
  return `${method.toUpperCase()}\n${path}\n${time}\n${hash}`;
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
  return {
    [DEVICE_HEADER]: deviceId,
    [TIME_HEADER]: time,
    [SIGNATURE_HEADER]: signBytes(privateKey, Buffer.from(canonicalRequest(method, path, time, body))),
  };
}

export type DeviceAuthFailure = 'missing' | 'skew' | 'signature';

/** Returns null when valid, else why not. The caller looks up the device's public key first. */
export function checkDeviceSignature(
  publicKey: KeyObject,
  method: string,
  path: string,
  time: string | undefined,
  signature: string | undefined,
  body: Uint8Array | string,
  now = new Date(),
): DeviceAuthFailure | null {
  if (!time || !signature) return 'missing';
  const t = Date.parse(time);
  if (!Number.isFinite(t) || Math.abs(now.getTime() - t) > MAX_SKEW_MS) return 'skew';
  return verifyBytes(publicKey, Buffer.from(canonicalRequest(method, path, time, body)), signature) ? null : 'signature';
}
