import { hkdfSync, randomBytes, scrypt as scryptCb, type ScryptOptions } from 'node:crypto';
import { openEnvelope, sealEnvelope } from './envelope.js';
import { EnvelopeError } from './errors.js';

/** Keys of one lineage (a golden image and its clones share them, so their chunks dedup). */
export interface LineageKeys {
  /** AES-256-GCM key for chunk blobs. */
  dataKey: Buffer;
  /** HMAC-SHA-256 key for chunk IDs. */
  idKey: Buffer;
}

export function generateLineageKeys(): LineageKeys {
  return { dataKey: randomBytes(32), idKey: randomBytes(32) };
}

/** Wraps lineage keys under a 32-byte key (server master key, or a device+password key). */
export function wrapLineageKeys(wrappingKey: Uint8Array, keys: LineageKeys, context: string): Buffer {
  return sealEnvelope(wrappingKey, Buffer.concat([keys.dataKey, keys.idKey]), Buffer.from(`carryon-keys:${context}`));
}

export function unwrapLineageKeys(wrappingKey: Uint8Array, wrapped: Uint8Array, context: string): LineageKeys {
  const raw = openEnvelope(wrappingKey, wrapped, Buffer.from(`carryon-keys:${context}`));
  if (raw.length !== 64) throw new EnvelopeError(`wrapped keys have ${raw.length} bytes, expected 64`);
  return { dataKey: raw.subarray(0, 32), idKey: raw.subarray(32, 64) };
}

export function encodeLineageKeys(keys: LineageKeys): string {
  return Buffer.concat([keys.dataKey, keys.idKey]).toString('base64');
}

export function decodeLineageKeys(text: string): LineageKeys {
  const raw = Buffer.from(text, 'base64');
  if (raw.length !== 64) throw new EnvelopeError('encoded lineage keys must be 64 bytes');
  return { dataKey: raw.subarray(0, 32), idKey: raw.subarray(32, 64) };
}

/** scrypt cost (2^17, ≈ 0.6 s here); stored with each wrap so it can rise later. */
export const SCRYPT_PARAMS = { N: 1 << 17, r: 8, p: 1, maxmem: 256 * 1024 * 1024 } as const satisfies ScryptOptions;

/**
 * Key that opens a laptop vault: scrypt over (device secret ‖ password). Neither alone suffices,
 * so a vault copied to another device, or opened without the password, stays shut.
 */
export function deriveDeviceUserKey(
  deviceSecret: Uint8Array,
  password: string,
  salt: Uint8Array,
  params: ScryptOptions = SCRYPT_PARAMS,
): Promise<Buffer> {
  const material = Buffer.concat([Buffer.from(deviceSecret), Buffer.from('\0'), Buffer.from(password, 'utf8')]);
  return new Promise((resolve, reject) => {
    scryptCb(material, salt, 32, params, (err, key) => (err ? reject(err) : resolve(key)));
  });
}

/**
 * The LUKS passphrase of one disk of one desktop on one laptop: HKDF over the keys the vault
 * unwraps (so it is released by exactly the rules that release them), bound to the desktop,
 * the disk and the laptop's wrap salt. With the vault's own random key in the input, another
 * holder of the (fleet-wide) lineage keys cannot derive it. Base64 text of 32 bytes (LUKS
 * wants a UTF-8 passphrase).
 */
export function deriveDiskSecret(keys: LineageKeys & { vaultKey?: Uint8Array }, desktopId: string, diskName: string, vaultSalt: Uint8Array): string {
  const ikm = Buffer.concat([keys.vaultKey ?? Buffer.alloc(0), keys.dataKey, keys.idKey]);
  const info = Buffer.from(`carryon-disk-luks:${keys.vaultKey ? 'v2' : 'v1'}:${desktopId}:${diskName}`, 'utf8');
  return Buffer.from(hkdfSync('sha256', ikm, vaultSalt, info, 32)).toString('base64');
}
