import { z } from 'zod';
import { findEntry, onlineSession, type ClientEnv } from './session.js';

const Power = z.object({ state: z.string(), host: z.string() });

/** `carryon start` / `stop`: run the desktop on a datacenter host, or shut it down there (policy onlineAllowed; the broker decides and audits). */
export async function powerOnline(env: ClientEnv, desktopRef: string, action: 'start' | 'stop' | 'reset') {
  const { broker } = await onlineSession(env);
  try {
    const entry = await findEntry(broker, desktopRef);
    const r = await broker.call('POST', `/v1/desktops/${encodeURIComponent(entry.id)}/${action}`, {}, Power);
    return { desktop: entry.name, ...r };
  } finally {
    await broker.close();
  }
}
