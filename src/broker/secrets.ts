import { randomBytes } from 'node:crypto';
import { mkdir, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import type { KeyObject } from 'node:crypto';
import { generateSigningKey, privateKeyFromPem, privateKeyToPem } from '../core/signing.js';
import { createPublicKey } from 'node:crypto';

async function loadOrCreate(path: string, make: () => Buffer | string): Promise<Buffer> {
  try {
    return await readFile(path);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err;
  }
  const value = make();
  await writeFile(path, value, { mode: 0o600, flag: 'wx' });
  return readFile(path);
}

/** Datacenter secrets in the data dir, each 0600, created at first start. */
export interface BrokerSecrets {
  /** Wraps lineage keys; shared with transfer servers. */
  masterKey: Buffer;
  /** Signs session tokens. */
  tokenKey: Buffer;
  /** Ed25519: signs offline leases and transfer tickets. */
  signing: { privateKey: KeyObject; publicKey: KeyObject };
}

export async function loadOrCreateSecrets(dir: string): Promise<BrokerSecrets> {
  await mkdir(dir, { recursive: true, mode: 0o700 });
  const masterKey = await loadOrCreate(join(dir, 'master.key'), () => randomBytes(32));
  const tokenKey = await loadOrCreate(join(dir, 'token.key'), () => randomBytes(32));
  const pem = await loadOrCreate(join(dir, 'signing.key'), () => privateKeyToPem(generateSigningKey().privateKey));
  if (masterKey.length !== 32) throw new Error(`${join(dir, 'master.key')} must hold 32 bytes`);
  const privateKey = privateKeyFromPem(pem.toString());
  return { masterKey, tokenKey, signing: { privateKey, publicKey: createPublicKey(privateKey) } };
}
