import { hkdfSync, randomBytes, scrypt as scryptCb, type ScryptOptions } from 'node:crypto';
import { openEnvelope, sealEnvelope } from './envelope.js';
import { EnvelopeError } from './errors.js';

/** Keys of one lineage (a golden image and its clones share them, so their chunks dedup). */
export interface LineageKeys {
  /** The current data key: blob subkeys derive from it (core/blob.ts). */
  dataKey: Buffer;
  /** HMAC-SHA-256 key for chunk IDs (never rotated: IDs must stay stable for dedup). */
  idKey: Buffer;
  /** Generation of `dataKey` (0, the lineage's first, when absent); each blob names the generation that sealed it. */
  dataKeyId?: number;
  /** Earlier data keys by generation, so blobs sealed before a rotation stay readable. */
  olderDataKeys?: ReadonlyMap<number, Buffer>;
}

export function generateLineageKeys(): LineageKeys {
  return { dataKey: randomBytes(32), idKey: randomBytes(32) };
}

/** The data key of generation `id`, or null when this holder does not have it. */
export function dataKeyFor(keys: LineageKeys, id: number): Buffer | null {
  if (id === (keys.dataKeyId ?? 0)) return keys.dataKey;
  return keys.olderDataKeys?.get(id) ?? null;
}

/** A new data key generation for the lineage: new blobs use it, the old keys keep opening old blobs. */
export function rotateDataKey(keys: LineageKeys): LineageKeys {
  const current = keys.dataKeyId ?? 0;
  const older = new Map(keys.olderDataKeys ?? []);
  older.set(current, keys.dataKey);
  return { dataKey: randomBytes(32), idKey: keys.idKey, dataKeyId: current + 1, olderDataKeys: older };
}

/**
 * Binary form: a never-rotated lineage is dataKey ‖ idKey (64 bytes, as before); a rotated one is
 * 0x02 ‖ idKey ‖ count u8 ‖ count × (generation u32 ‖ key), the current generation last.
 */
function lineageKeyBytes(keys: LineageKeys): Buffer {
  if ((keys.dataKeyId ?? 0) === 0 && !keys.olderDataKeys?.size) return Buffer.concat([keys.dataKey, keys.idKey]);
  const gens = [...(keys.olderDataKeys ?? new Map<number, Buffer>()).entries()].filter(([g]) => g !== (keys.dataKeyId ?? 0)).sort((a, b) => a[0] - b[0]);
  gens.push([keys.dataKeyId ?? 0, keys.dataKey]);
  if (gens.length > 255) throw new EnvelopeError('too many data key generations');
  const parts = [Buffer.from([2]), keys.idKey, Buffer.from([gens.length])];
  for (const [g, k] of gens) {
    const head = Buffer.alloc(4);
    head.writeUInt32BE(g);
    parts.push(head, k);
  }
  return Buffer.concat(parts);
}

function lineageKeysFromBytes(raw: Buffer): LineageKeys {
  if (raw.length === 64) return { dataKey: raw.subarray(0, 32), idKey: raw.subarray(32, 64) };
  const n = raw[33] ?? 0;
  if (raw[0] !== 2 || n < 1 || raw.length !== 34 + 36 * n) throw new EnvelopeError(`lineage keys of ${raw.length} bytes are not in a known form`);
  const older = new Map<number, Buffer>();
  let current: [number, Buffer] = [0, Buffer.alloc(0)];
  for (let i = 0; i < n; i++) {
    const at = 34 + 36 * i;
    current = [raw.readUInt32BE(at), raw.subarray(at + 4, at + 36)];
    if (i < n - 1) older.set(current[0], current[1]);
  }
  return { dataKey: current[1], idKey: raw.subarray(1, 33), dataKeyId: current[0], olderDataKeys: older };
}

/** Wraps lineage keys under a 32-byte key (server master key, or a device+password key). */
export function wrapLineageKeys(wrappingKey: Uint8Array, keys: LineageKeys, context: string): Buffer {
  return sealEnvelope(wrappingKey, lineageKeyBytes(keys), Buffer.from(`carryon-keys:${context}`));
}

export function unwrapLineageKeys(wrappingKey: Uint8Array, wrapped: Uint8Array, context: string): LineageKeys {
  return lineageKeysFromBytes(openEnvelope(wrappingKey, wrapped, Buffer.from(`carryon-keys:${context}`)));
}

export function encodeLineageKeys(keys: LineageKeys): string {
  return lineageKeyBytes(keys).toString('base64');
}

export function decodeLineageKeys(text: string): LineageKeys {
  return lineageKeysFromBytes(Buffer.from(text, 'base64'));
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
 * wants a UTF-8 passphrase). With `layer`, one secret per layer (base, top): a layer file put in
 * the other's place does not open. Without, the one secret both layers of vaults made before
 * that share.
 */
export function deriveDiskSecret(keys: LineageKeys & { vaultKey?: Uint8Array }, desktopId: string, diskName: string, vaultSalt: Uint8Array, layer?: 'base' | 'top'): string {
  const ikm = Buffer.concat([keys.vaultKey ?? Buffer.alloc(0), keys.dataKey, keys.idKey]);
  const version = layer ? `v3:${layer}` : keys.vaultKey ? 'v2' : 'v1';
  const info = Buffer.from(`carryon-disk-luks:${version}:${desktopId}:${diskName}`, 'utf8');
  return Buffer.from(hkdfSync('sha256', ikm, vaultSalt, info, 32)).toString('base64');
}
