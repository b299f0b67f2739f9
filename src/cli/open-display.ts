import { z } from 'zod';
import { findEntry, onlineSession, type ClientEnv } from '../client/session/session.js';

const Ticket = z.object({ desktop: z.string(), desktopId: z.string(), expiresAt: z.string(), url: z.string(), socket: z.string() });

/** `carryon open`: a one-time link to the desktop's screen in a browser (one connection, 30 s, this user and desktop only). */
export async function openDisplayLink(env: ClientEnv, desktopRef: string): Promise<z.infer<typeof Ticket>> {
  const { broker } = await onlineSession(env);
  try {
    const entry = await findEntry(broker, desktopRef);
    return await broker.call('POST', `/v1/desktops/${encodeURIComponent(entry.id)}/display-ticket`, {}, Ticket);
  } finally {
    await broker.close();
  }
}
