import { rm } from 'node:fs/promises';
import { join } from 'node:path';
import { z } from 'zod';
import { writeFileAtomic } from '../../files/atomic.js';
import { runDir } from '../../live/disks/disks.js';
import { readJsonFile } from '../../files/json-file.js';
import type { DesktopRecords } from '../../live/disks/state.js';

/**
 * Why the agent is about to stop the process that holds a desktop (its SIGTERM carries no words):
 * written just before the signal, read by `run` so it can say why its guest is shutting down.
 * Not authenticated: it only changes a message, never what happens.
 */
export const StopReason = z.enum(['lease-expired', 'locked', 'wiped']);
export type StopReason = z.infer<typeof StopReason>;

const file = (vault: DesktopRecords, desktopId: string) => join(runDir(vault, desktopId), 'stop-reason.json');

export async function writeStopReason(vault: DesktopRecords, desktopId: string, reason: StopReason): Promise<void> {
  await writeFileAtomic(file(vault, desktopId), JSON.stringify({ reason, at: new Date().toISOString() })).catch(() => undefined);
}

/** The reason left for this stop, taken (removed) so a later Ctrl-C is not mistaken for it. */
export async function takeStopReason(vault: DesktopRecords, desktopId: string): Promise<StopReason | null> {
  const r = await readJsonFile(file(vault, desktopId), z.object({ reason: StopReason }).loose(), { missing: null, damaged: null });
  await rm(file(vault, desktopId), { force: true });
  return r?.reason ?? null;
}

export function stopReasonWords(reason: StopReason | null): string {
  if (reason === 'lease-expired') return 'the offline lease ran out without contact with the broker: the desktop is locked';
  if (reason === 'locked') return 'an administrator locked this desktop';
  if (reason === 'wiped') return 'an administrator wiped this desktop from this laptop';
  return 'asked to stop (Ctrl-C or SIGTERM)';
}
