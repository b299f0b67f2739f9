import { rename } from 'node:fs/promises';
import { join } from 'node:path';
import { z } from 'zod';
import { writeFileAtomic } from '../../files/atomic.js';
import { readJsonFile } from '../../files/json-file.js';

/** What happened on this laptop without the broker (run, serve, export, read failures), for the audit trail. */
export const OfflineEvent = z.object({ time: z.string(), action: z.string().regex(/^[a-z][a-z-]{0,39}$/), desktopId: z.string().optional(), detail: z.string().max(1000).optional() });
export type OfflineEvent = z.infer<typeof OfflineEvent>;

const file = (home: string) => join(home, 'events.json');

/**
 * The events not yet reported. A file that does not read is set aside (`events.json.damaged-<time>`,
 * for a person to look at) rather than overwritten by the next write, and the list starts again.
 */
async function read(home: string): Promise<OfflineEvent[]> {
  try {
    return await readJsonFile(file(home), z.array(OfflineEvent), { missing: [] });
  } catch {
    await rename(file(home), `${file(home)}.damaged-${Date.now()}`).catch(() => undefined);
    return [];
  }
}

/** Appends an event (the newest 500 are kept); never fails the operation it reports. */
export async function recordEvent(home: string, action: string, desktopId?: string, detail?: string): Promise<void> {
  const list = await read(home);
  list.push({ time: new Date().toISOString(), action, desktopId, detail: detail?.slice(0, 1000) });
  await writeFileAtomic(file(home), JSON.stringify(list.slice(-500))).catch(() => undefined);
}

/** The events not yet reported, and a function that forgets exactly those once the broker took them. */
export async function pendingEvents(home: string): Promise<{ events: OfflineEvent[]; sent: () => Promise<void> }> {
  const events = await read(home);
  return {
    events,
    sent: async () => {
      const now = await read(home);
      await writeFileAtomic(file(home), JSON.stringify(now.slice(events.length))).catch(() => undefined);
    },
  };
}
