import { createCipheriv, createDecipheriv, randomBytes } from 'node:crypto';
import { EnvelopeError } from './errors.js';

/**
 * Generic AES-256-GCM envelope for small secrets and records (wrapped keys, vault state):
 * version(1) ‖ nonce(12) ‖ ciphertext ‖ tag(16). The caller's AAD binds it to its context.
 */
const VERSION = 1;
const NONCE = 12;
const TAG = 16;

export function sealEnvelope(key: Uint8Array, plaintext: Uint8Array, aad: Uint8Array = Buffer.alloc(0)): Buffer {
  if (key.length !== 32) throw new EnvelopeError(`envelope key must be 32 bytes, got ${key.length}`);
  const nonce = randomBytes(NONCE);
  const cipher = createCipheriv('aes-256-gcm', key, nonce);
  cipher.setAAD(aad);
  const body = Buffer.concat([cipher.update(plaintext), cipher.final()]);
  return Buffer.concat([Buffer.from([VERSION]), nonce, body, cipher.getAuthTag()]);
}

export function openEnvelope(key: Uint8Array, envelope: Uint8Array, aad: Uint8Array = Buffer.alloc(0)): Buffer {
  if (key.length !== 32) throw new EnvelopeError(`envelope key must be 32 bytes, got ${key.length}`);
  if (envelope.length < 1 + NONCE + TAG) throw new EnvelopeError('envelope is truncated');
  if (envelope[0] !== VERSION) throw new EnvelopeError(`envelope version ${envelope[0]} is not supported`);
  const nonce = envelope.subarray(1, 1 + NONCE);
  const tag = envelope.subarray(envelope.length - TAG);
  const decipher = createDecipheriv('aes-256-gcm', key, nonce);
  decipher.setAAD(aad);
  decipher.setAuthTag(tag);
  try {
    return Buffer.concat([decipher.update(envelope.subarray(1 + NONCE, envelope.length - TAG)), decipher.final()]);
  } catch {
    throw new EnvelopeError('envelope does not authenticate (wrong key, wrong context, or tampered)');
  }
}
