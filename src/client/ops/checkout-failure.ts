import { rm } from 'node:fs/promises';
import { join } from 'node:path';
import { z } from 'zod';
import { writeFileAtomic } from '../../files/atomic.js';
import { runDir } from '../../live/disks/disks.js';
import { recordEvent } from '../../live/disks/events.js';
import { readJsonFile } from '../../files/json-file.js';
import type { Vault } from '../vault/vault.js';

/** Why a check-out stopped for good (not a pause): `status` shows it until a check-out completes or the copy is removed. */
const Failure = z.object({ reason: z.string(), message: z.string(), at: z.string() });
export type CheckoutFailure = z.infer<typeof Failure>;

const file = (vault: Vault, desktopId: string) => join(runDir(vault, desktopId), 'failed.json');

export async function recordCheckoutFailure(vault: Vault, desktopId: string, reason: string, message: string): Promise<void> {
  await writeFileAtomic(file(vault, desktopId), JSON.stringify({ reason, message, at: new Date().toISOString() })).catch(() => undefined);
  await recordEvent(vault.home, 'checkout-failed', desktopId, message);
}

export async function readCheckoutFailure(vault: Vault, desktopId: string): Promise<CheckoutFailure | null> {
  return readJsonFile(file(vault, desktopId), Failure, { missing: null, damaged: null });
}

export async function clearCheckoutFailure(vault: Vault, desktopId: string): Promise<void> {
  await rm(file(vault, desktopId), { force: true });
}
