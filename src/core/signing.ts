import { createPrivateKey, createPublicKey, generateKeyPairSync, sign, verify, type KeyObject } from 'node:crypto';
import { EnvelopeError } from './errors.js';

/** Ed25519 helpers: keys travel as base64 SPKI/PKCS8 DER. */
export function generateSigningKey(): { privateKey: KeyObject; publicKey: KeyObject } {
  return generateKeyPairSync('ed25519');
}

export function publicKeyToBase64(key: KeyObject): string {
  return key.export({ format: 'der', type: 'spki' }).toString('base64');
}

export function publicKeyFromBase64(text: string): KeyObject {
  try {
    const key = createPublicKey({ key: Buffer.from(text, 'base64'), format: 'der', type: 'spki' });
    if (key.asymmetricKeyType !== 'ed25519') throw new Error(`not ed25519 but ${key.asymmetricKeyType}`);
    return key;
  } catch (err) {
    throw new EnvelopeError(`not an Ed25519 public key: ${(err as Error).message}`);
  }
}

export function privateKeyToPem(key: KeyObject): string {
  return key.export({ format: 'pem', type: 'pkcs8' }).toString();
}

export function privateKeyFromPem(pem: string): KeyObject {
  return createPrivateKey(pem);
}

export function signBytes(privateKey: KeyObject, data: Uint8Array): string {
  return sign(null, data, privateKey).toString('base64');
}

export function verifyBytes(publicKey: KeyObject, data: Uint8Array, signatureB64: string): boolean {
  try {
    return verify(null, data, publicKey, Buffer.from(signatureB64, 'base64'));
  } catch {
    return false;
  }
}
