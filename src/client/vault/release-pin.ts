import { createPublicKey, type KeyObject } from 'node:crypto';
import { join } from 'node:path';
import { z } from 'zod';
import { CarryonError } from '../../core/errors.js';
import { publicKeyFromBase64, signBytes, verifyBytes } from '../../core/signing.js';
import { writeFileAtomic } from '../../files/atomic.js';
import { readJsonFile } from '../../files/json-file.js';

/**
 * The release public key pinned at enrolment (issue 28): client updates verify against it and
 * nothing else. The agent has no vault key (it runs without the user's password), so the record
 * is signed by the device key, like the agent's lock records: editing the file (or swapping the
 * key in it) without that key breaks it. The broker cannot change it afterwards: a release signed
 * by another key does not verify, and pinning a new key takes a new enrolment.
 */
export const RELEASE_PIN = 'release-key.json';
const PinFile = z.object({ v: z.literal(1), deviceId: z.string(), publicKey: z.string().nullable(), pinnedAt: z.string(), sig: z.string() }).strict();
const CONTEXT = 'carryon-release-pin:v1\n';
const signed = (deviceId: string, publicKey: string | null) => Buffer.from(CONTEXT + JSON.stringify({ deviceId, publicKey }));

/** At enrolment: the key the broker states now (over the pinned TLS connection); null when it has none. */
export async function pinReleaseKey(home: string, device: { id: string; key: KeyObject }, publicKey: string | null): Promise<void> {
  if (publicKey !== null) publicKeyFromBase64(publicKey); // a broker stating something else is refused here, not at the first update
  const file = { v: 1 as const, deviceId: device.id, publicKey, pinnedAt: new Date().toISOString(), sig: signBytes(device.key, signed(device.id, publicKey)) };
  await writeFileAtomic(join(home, RELEASE_PIN), JSON.stringify(file, null, 2));
}

/**
 * The pinned key; null when the device was enrolled before releases existed, or with a broker that
 * had no release key (it gets no updates: enrol again to pin one). A record altered outside
 * Carryon is an error, never "no key".
 */
export async function readReleasePin(home: string, device: { id: string; key: KeyObject }): Promise<KeyObject | null> {
  const path = join(home, RELEASE_PIN);
  const file = await readJsonFile(path, PinFile, { missing: null });
  if (!file) return null;
  if (file.deviceId !== device.id || !verifyBytes(createPublicKey(device.key), signed(file.deviceId, file.publicKey), file.sig)) {
    throw new CarryonError('release-pin-tampered', `${path} was altered outside Carryon (its device signature does not verify): updates are refused until this device is enrolled again`);
  }
  return file.publicKey === null ? null : publicKeyFromBase64(file.publicKey);
}
