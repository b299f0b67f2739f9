import type { FastifyInstance } from 'fastify';

/**
 * Closes a server without waiting on its clients: no new connections, idle keep-alive ones closed at
 * once, and requests still in flight after `graceMs` (a stalled upload, a laptop's long chunk stream)
 * cut off. Fastify's own close waits for every request to end, so a stopped broker could hold its
 * port for as long as any laptop kept a transfer going; clients retry a cut-off request.
 */
export async function closePromptly(app: FastifyInstance, graceMs = 2000): Promise<void> {
  app.server.closeIdleConnections();
  const cut = setTimeout(() => app.server.closeAllConnections(), graceMs);
  try {
    await app.close();
  } finally {
    clearTimeout(cut);
  }
}
