import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';

/** How much of a refused body is read and thrown away so that its sender can read the answer. */
const DRAIN_LIMIT = 256 * 1024 * 1024;

/**
 * JSON and octet streams only: Fastify's own `text/plain` parser would hand a route a string,
 * which its schema then refuses as a 400 where the truth is 415 (wrong media type).
 */
export function acceptOnlyOurMediaTypes(app: FastifyInstance): void {
  app.removeContentTypeParser('text/plain');
}

/**
 * A body refused as too large (413) is answered without closing the connection at once: a client
 * still sending would see its write fail with a TLS EOF or a reset and never read the 413. The
 * rest of the body is read and dropped (up to DRAIN_LIMIT, then the connection is cut), and the
 * connection stays usable, as after any other answer.
 */
export function drainRefusedBody(req: FastifyRequest, reply: FastifyReply): void {
  const raw = req.raw;
  if (raw.readableEnded || raw.destroyed) return;
  reply.removeHeader('connection');
  let dropped = 0;
  raw.on('data', (chunk: Buffer) => {
    dropped += chunk.length;
    if (dropped > DRAIN_LIMIT) raw.socket.destroy();
  });
  raw.resume();
}
