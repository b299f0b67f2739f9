import { createPrivateKey, createPublicKey, randomBytes, type KeyObject } from 'node:crypto';
import { existsSync } from 'node:fs';
import { mkdir, readFile, statfs } from 'node:fs/promises';
import { cpus, homedir, loadavg, platform, release, totalmem } from 'node:os';
import { join } from 'node:path';
import { z } from 'zod';
import { CarryonError } from '../../core/errors.js';
import { generateSigningKey, privateKeyFromPem, privateKeyToPem, publicKeyToBase64 } from '../../core/signing.js';
import { writeFileAtomic } from '../../files/atomic.js';
import { readJsonFile } from '../../files/json-file.js';
import { sealToTpm, TPM_KEY_PUBLIC, tpmAvailable, TpmError, unsealDeviceKey, unsealFromTpm } from './tpm.js';

export function defaultHome(): string {
  return process.env.CARRYON_HOME ?? join(homedir(), '.carryon');
}

const Fingerprint = z.string().regex(/^[0-9a-f]{64}$/);

export const DeviceFile = z.object({
  deviceId: z.string().nullable(),
  name: z.string(),
  /** The first broker (files from before broker lists name only this one; it is kept for them). */
  brokerUrl: z.string(),
  fingerprint: Fingerprint,
  /** Every broker of the deployment in the order tried, each with its own pinned certificate. */
  brokers: z.array(z.object({ url: z.string(), fingerprint: Fingerprint, servername: z.string().optional() })).min(1).optional(),
  signingPublicKey: z.string(),
  secretStorage: z.enum(['file', 'tpm']),
});
export type DeviceFile = z.infer<typeof DeviceFile>;

/** The brokers this device talks to, in order: the list, or the single broker of an older file. */
export function brokerEndpoints(info: DeviceFile): { url: string; fingerprint: string; servername?: string }[] {
  return info.brokers ?? [{ url: info.brokerUrl, fingerprint: info.fingerprint }];
}

export interface DeviceIdentity {
  info: DeviceFile;
  privateKey: KeyObject;
  publicKeyB64: string;
  /** The device secret: from its file, or unsealed by the TPM with the password as authorization value. */
  secret(password: string): Promise<Buffer>;
}

export type SecretStorage = 'file' | 'tpm';

/** `auto`: the TPM when one is usable (device or TPM2TOOLS_TCTI, and tpm2-tools), else a 0600 file. */
export function chooseSecretStorage(wanted: SecretStorage | 'auto'): SecretStorage {
  if (wanted === 'tpm' && !tpmAvailable()) throw new TpmError('no usable TPM: needs /dev/tpmrm0 (or TPM2TOOLS_TCTI) and tpm2-tools');
  return wanted === 'auto' ? (tpmAvailable() ? 'tpm' : 'file') : wanted;
}

/**
 * Creates the device key pair and secret. With a TPM both are sealed by it (device secret: PCR
 * policy + the password as authorization value; device key: PCR policy), so neither is on disk
 * in the clear; without one they are 0600 files in a 0700 home.
 */
export async function createDeviceKeys(home: string, storage: SecretStorage, password: string): Promise<{ publicKeyB64: string; secretStorage: SecretStorage }> {
  await mkdir(home, { recursive: true, mode: 0o700 });
  if (existsSync(join(home, 'device.key')) || existsSync(join(home, TPM_KEY_PUBLIC))) throw new CarryonError('already-enrolled', `${home} already holds a device identity`);
  const { privateKey, publicKey } = generateSigningKey();
  const secret = randomBytes(32);
  if (storage === 'tpm') {
    await sealToTpm(home, secret, password, privateKey.export({ format: 'der', type: 'pkcs8' }));
  } else {
    await writeFileAtomic(join(home, 'device.secret'), secret);
    await writeFileAtomic(join(home, 'device.key'), privateKeyToPem(privateKey));
  }
  return { publicKeyB64: publicKeyToBase64(publicKey), secretStorage: storage };
}

export async function loadDevice(home: string): Promise<DeviceIdentity> {
  const info = await readJsonFile(join(home, 'device.json'), DeviceFile, { missing: null });
  if (!info || !info.deviceId) throw new CarryonError('not-enrolled', `no enrolled device in ${home}: run \`carryon enroll <broker-url>\` first`);
  // Homes enrolled before the key was sealed keep their PEM.
  const privateKey = info.secretStorage === 'tpm' && existsSync(join(home, TPM_KEY_PUBLIC))
    ? createPrivateKey({ key: await unsealDeviceKey(home), format: 'der', type: 'pkcs8' })
    : privateKeyFromPem((await readIdentityFile(home, 'device.key')).toString('utf8'));
  const secret = (password: string) => (info.secretStorage === 'tpm' ? oneAtATime(() => unsealFromTpm(home, password)) : readIdentityFile(home, 'device.secret'));
  return { info, privateKey, publicKeyB64: publicKeyToBase64(createPublicKey(privateKey)), secret };
}

/**
 * TPM unseals run one after another: a TPM holds only a few transient objects, and side-by-side
 * tpm2 tool runs (a check-out derives its wrap key beside its online wrap) fail with "out of
 * memory for object contexts".
 */
let tpmTail: Promise<unknown> = Promise.resolve();
function oneAtATime<T>(fn: () => Promise<T>): Promise<T> {
  const run = tpmTail.then(fn);
  tpmTail = run.catch(() => undefined);
  return run;
}

/**
 * A file of the device identity: one that is gone (a copied or half-restored home) says what is
 * wrong and what to do instead of a raw ENOENT.
 */
async function readIdentityFile(home: string, name: 'device.key' | 'device.secret'): Promise<Buffer> {
  try {
    return await readFile(join(home, name));
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code !== 'ENOENT' && code !== 'EACCES' && code !== 'EISDIR') throw err;
    const why = code === 'ENOENT' ? 'is missing' : code === 'EACCES' ? 'cannot be read (permissions)' : 'is not a file';
    throw new CarryonError('home-damaged', `${join(home, name)} ${why}: this home (${home}) is damaged or was copied without its device files; restore it from a backup, or enrol again in an empty home (\`carryon --home <new-dir> enroll <broker-url>\`) and have an admin revoke the old device`);
  }
}

export async function hostFacts(path: string) {
  const fs = await statfs(path);
  return {
    os: `${platform()} ${release()}`,
    cpus: cpus().length,
    ramBytes: totalmem(),
    freeDiskBytes: fs.bavail * fs.bsize,
    loadAvg: loadavg(),
  };
}
