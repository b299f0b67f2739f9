import { createHash, createPrivateKey, generateKeyPairSync, type KeyObject } from 'node:crypto';
import { createReadStream } from 'node:fs';
import { z } from 'zod';
import { CarryonError } from '../errors.js';
import { publicKeyFromBase64, publicKeyToBase64, signBytes, verifyBytes } from '../signing.js';

/**
 * Client releases (issue 28): a bundle is what `npm pack` makes of this project; its manifest
 * (name, version, the bundle's SHA-256 and size) is signed offline with the release key, which the
 * broker never holds: the broker only passes bundles and signatures on, and laptops verify them
 * against the public key pinned at enrolment.
 */
export const VERSION_RE = /^(0|[1-9]\d{0,5})\.(0|[1-9]\d{0,5})\.(0|[1-9]\d{0,5})$/;
const Version = z.string().regex(VERSION_RE, 'a version is MAJOR.MINOR.PATCH (digits only)');

export const ReleaseManifest = z.object({
  v: z.literal(1),
  name: z.literal('carryon'),
  version: Version,
  sha256: z.string().regex(/^[0-9a-f]{64}$/),
  size: z.number().int().min(1),
  /** Laptops running an older version than this need a full install (not offered to them). */
  minimumVersion: Version.optional(),
}).strict();
export type ReleaseManifest = z.infer<typeof ReleaseManifest>;

/** The signature file (`carryon admin releases sign`): the manifest as signed, and its signature. */
export const ReleaseSignature = z.object({ manifest: z.string().max(4096), signature: z.string().max(200) }).strict();
export type ReleaseSignature = z.infer<typeof ReleaseSignature>;

/** Domain separation: no other Ed25519 signature of this project can pass for a release. */
const CONTEXT = 'carryon-release:v1\n';

/** The signature file travels in this header (base64 of its JSON) beside a streamed bundle. */
export const RELEASE_SIGNATURE_HEADER = 'x-carryon-release-signature';

/** Bundles larger than this are refused everywhere (a packed client is a few MiB). */
export const MAX_BUNDLE_BYTES = 256 * 1024 * 1024;

/** -1, 0, 1 as a is older, the same, newer than b (MAJOR.MINOR.PATCH, numerically). */
export function compareVersions(a: string, b: string): number {
  const pa = parseVersion(a);
  const pb = parseVersion(b);
  for (let i = 0; i < 3; i++) if (pa[i] !== pb[i]) return pa[i]! < pb[i]! ? -1 : 1;
  return 0;
}

function parseVersion(v: string): number[] {
  const m = VERSION_RE.exec(v);
  if (!m) throw new CarryonError('invalid', `bad version ${JSON.stringify(v)}: expected MAJOR.MINOR.PATCH`);
  return [Number(m[1]), Number(m[2]), Number(m[3])];
}

export async function sha256File(path: string): Promise<{ sha256: string; size: number }> {
  const h = createHash('sha256');
  let size = 0;
  for await (const chunk of createReadStream(path)) {
    h.update(chunk as Buffer);
    size += (chunk as Buffer).length;
  }
  return { sha256: h.digest('hex'), size };
}

export function signRelease(privateKey: KeyObject, manifest: ReleaseManifest): ReleaseSignature {
  const text = JSON.stringify(ReleaseManifest.parse(manifest));
  return { manifest: Buffer.from(text).toString('base64'), signature: signBytes(privateKey, Buffer.from(CONTEXT + text)) };
}

/**
 * The manifest, only when the signature verifies under `publicKey`. Throws CarryonError
 * `release-signature` otherwise (or when the signed text is not a manifest).
 */
export function verifyRelease(publicKey: KeyObject, sig: ReleaseSignature): ReleaseManifest {
  const text = Buffer.from(sig.manifest, 'base64').toString('utf8');
  if (!verifyBytes(publicKey, Buffer.from(CONTEXT + text), sig.signature)) throw new CarryonError('release-signature', 'the release signature does not verify under the release key');
  const parsed = ReleaseManifest.safeParse(JSON.parse(text));
  if (!parsed.success) throw new CarryonError('release-signature', `the signed manifest is not a release manifest: ${parsed.error.issues[0]?.message}`);
  return parsed.data;
}

export function parseSignatureFile(text: string, where: string): ReleaseSignature {
  try {
    return ReleaseSignature.parse(JSON.parse(text));
  } catch (err) {
    throw new CarryonError('invalid', `${where} is not a release signature file: ${(err as Error).message.split('\n')[0]}`);
  }
}

/** An Ed25519 key pair; the private half as encrypted PKCS#8 PEM (PBES2: PBKDF2 and AES-256-CBC under the passphrase). */
export function newReleaseKey(passphrase: string): { privatePem: string; publicB64: string } {
  if (passphrase.length < 8) throw new CarryonError('invalid', 'the release key passphrase must be at least 8 characters');
  const { privateKey, publicKey } = generateKeyPairSync('ed25519');
  const privatePem = privateKey.export({ format: 'pem', type: 'pkcs8', cipher: 'aes-256-cbc', passphrase }).toString();
  return { privatePem, publicB64: publicKeyToBase64(publicKey) };
}

export function loadReleasePrivateKey(pem: string, passphrase: string): KeyObject {
  try {
    const key = createPrivateKey({ key: pem, format: 'pem', passphrase });
    if (key.asymmetricKeyType !== 'ed25519') throw new Error(`an ${key.asymmetricKeyType} key, not Ed25519`);
    return key;
  } catch (err) {
    throw new CarryonError('release-key', `the release key does not open: wrong passphrase, or not a release key (${(err as Error).message})`);
  }
}

/** The public half as configured on the broker (base64 SPKI, one line); a clear error when it is not one. */
export function parseReleasePublicKey(text: string, where: string): KeyObject {
  try {
    return publicKeyFromBase64(text.trim());
  } catch (err) {
    throw new CarryonError('bad-config', `${where} is not a release public key (base64 Ed25519 SPKI, as \`carryon admin releases keygen\` writes it): ${(err as Error).message}`);
  }
}
