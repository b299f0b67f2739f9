import { createHmac, hkdfSync, randomBytes, timingSafeEqual, type KeyObject } from 'node:crypto';
import { z } from 'zod';
import { openEnvelope, sealEnvelope } from '../../core/envelope.js';
import { EnvelopeError } from '../../core/errors.js';
import { decodeLineageKeys, encodeLineageKeys, type LineageKeys } from '../../core/keys.js';
import { publicKeyFromBase64, publicKeyToBase64 } from '../../core/signing.js';

/**
 * What the vault wrap of one desktop holds (scrypt(device secret ‖ password) opens it): the
 * lineage keys, a random vault key that never leaves this laptop, and the public keys that
 * policy is checked against. Pinned here, not in the plaintext device.json, so editing files
 * cannot swap the key a lease must verify against.
 */
export interface DesktopKeys extends LineageKeys {
  /** MACs the state files and keys the LUKS secrets (another holder of the lineage keys cannot derive them). */
  vaultKey: Buffer;
  /** The broker's lease-signing key, pinned at check-out. */
  brokerKey: KeyObject;
  /** This device's agent key: what the agent writes without the password (lock records) is signed by it. */
  deviceKey: KeyObject;
}

const Sealed = z.object({ v: z.literal(2), lineage: z.string(), vaultKey: z.string(), broker: z.string(), device: z.string() });

export function newDesktopKeys(lineage: LineageKeys, brokerKey: KeyObject, deviceKey: KeyObject): DesktopKeys {
  return { ...lineage, vaultKey: randomBytes(32), brokerKey, deviceKey };
}

export function sealDesktopKeys(wrappingKey: Uint8Array, k: DesktopKeys, desktopId: string): Buffer {
  const body = { v: 2, lineage: encodeLineageKeys(k), vaultKey: k.vaultKey.toString('base64'), broker: publicKeyToBase64(k.brokerKey), device: publicKeyToBase64(k.deviceKey) };
  return sealEnvelope(wrappingKey, Buffer.from(JSON.stringify(body)), Buffer.from(`carryon-vault:v2:${desktopId}`));
}

/** Throws EnvelopeError when the key is wrong or the wrap was altered. */
export function openDesktopKeys(wrappingKey: Uint8Array, wrapped: Uint8Array, desktopId: string): DesktopKeys {
  const raw = openEnvelope(wrappingKey, wrapped, Buffer.from(`carryon-vault:v2:${desktopId}`));
  const parsed = Sealed.safeParse(JSON.parse(raw.toString('utf8')));
  if (!parsed.success) throw new EnvelopeError('the vault wrap holds an unknown format');
  const lineage = decodeLineageKeys(parsed.data.lineage);
  return { ...lineage, vaultKey: Buffer.from(parsed.data.vaultKey, 'base64'), brokerKey: publicKeyFromBase64(parsed.data.broker), deviceKey: publicKeyFromBase64(parsed.data.device) };
}

/** HMAC over a state record; `purpose` separates record kinds so one cannot stand in for another. */
export function recordMac(keys: DesktopKeys, desktopId: string, purpose: string, data: string): string {
  const k = Buffer.from(hkdfSync('sha256', keys.vaultKey, Buffer.alloc(0), `carryon-vault-mac:${purpose}:${desktopId}`, 32));
  return createHmac('sha256', k).update(data, 'utf8').digest('hex');
}

export function recordMacOk(keys: DesktopKeys, desktopId: string, purpose: string, data: string, mac: string): boolean {
  const want = Buffer.from(recordMac(keys, desktopId, purpose, data), 'hex');
  const got = Buffer.from(/^[0-9a-f]{64}$/.test(mac) ? mac : '', 'hex');
  return got.length === want.length && timingSafeEqual(got, want);
}
