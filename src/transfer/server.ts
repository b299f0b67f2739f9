import type { KeyObject } from 'node:crypto';
import Fastify, { type FastifyInstance, type FastifyReply, type FastifyRequest } from 'fastify';
import { PassThrough } from 'node:stream';
import { z, ZodError } from 'zod';
import { openBlob, sealChunk } from '../core/blob.js';
import { openDelta } from '../core/delta.js';
import { isChunkId, type ChunkId } from '../core/chunk-id.js';
import { CarryonError } from '../core/errors.js';
import { unwrapLineageKeys, type LineageKeys } from '../core/keys.js';
import { decodeManifest, referencedChunks } from '../core/manifest.js';
import { TicketError, verifyTicket, type TicketPayload } from '../core/ticket.js';
import { loadOrCreateTls } from '../net/tls-cert.js';
import type { ChunkStore } from '../store/chunk-store.js';
import { blobFrame, endFrame, errorFrame, FRAME_BLOB, FRAME_DELTA, FRAME_END, FrameDecoder, type Frame } from './frames.js';

export interface TransferServerOptions {
  id: string;
  host?: string;
  port?: number;
  slots: number;
  store: ChunkStore;
  masterKey: Buffer;
  brokerPublicKey: KeyObject;
  tlsDir: string;
  /** Test hook: alters a blob on its way out (simulates corruption in flight). */
  tamper?: (id: ChunkId, blob: Buffer) => Buffer;
}

export interface TransferStats {
  bytesIn: number;
  bytesOut: number;
  blobsRejected: number;
  perJob: Map<string, { bytesIn: number; bytesOut: number; chunksIn: number; chunksOut: number }>;
}

export interface TransferServer {
  id: string;
  url: string;
  fingerprint: string;
  slots: number;
  stats: TransferStats;
  close(): Promise<void>;
}

const IdList = (max: number) => z.object({ ids: z.array(z.string().refine(isChunkId, 'not a chunk ID')).max(max) }).strict();

const STATUS_BY_CODE: Record<string, number> = { 'wrong-direction': 403, 'out-of-scope': 403, 'unknown-manifest': 404 };

class Scope {
  constructor(readonly allowed: Set<ChunkId>, readonly keys: LineageKeys) {}
}

/**
 * Stateless transfer server: trusts a ticket by the broker's signature alone, then serves or
 * accepts exactly the chunks the ticket's manifests reference. Blobs travel as stored.
 */
export async function startTransferServer(opts: TransferServerOptions): Promise<TransferServer> {
  const tls = await loadOrCreateTls({ dir: opts.tlsDir });
  const app: FastifyInstance = Fastify({ https: { cert: tls.cert, key: tls.key }, bodyLimit: 64 * 1024 * 1024, logger: false });
  const stats: TransferStats = { bytesIn: 0, bytesOut: 0, blobsRejected: 0, perJob: new Map() };
  const scopes = new Map<string, Promise<Scope>>();
  const streams = new Map<string, number>();

  app.addContentTypeParser('application/octet-stream', (_req, payload, done) => done(null, payload));
  app.setErrorHandler((err: Error & { statusCode?: number }, _req, reply) => {
    const status =
      err instanceof TicketError ? (err.reason === 'wrong-server' ? 403 : 401)
      : err instanceof CarryonError ? (STATUS_BY_CODE[err.code] ?? 400)
      : err instanceof ZodError ? 400
      : err.statusCode && err.statusCode < 500 ? err.statusCode : 500;
    const code = err instanceof CarryonError ? err.code : status === 413 ? 'too-large' : status < 500 ? 'invalid' : 'internal';
    void reply.status(status).send({ error: code, message: err.message });
  });

  const jobStats = (jobId: string) => {
    let s = stats.perJob.get(jobId);
    if (!s) stats.perJob.set(jobId, (s = { bytesIn: 0, bytesOut: 0, chunksIn: 0, chunksOut: 0 }));
    return s;
  };

  const loadScope = (t: TicketPayload): Promise<Scope> => {
    const key = `${t.jobId}:${t.manifests.join(',')}`;
    let scope = scopes.get(key);
    if (!scope) {
      scope = (async () => {
        const allowed = new Set<ChunkId>();
        for (const digest of t.manifests) {
          const raw = await opts.store.getManifest(digest);
          if (!raw) throw new CarryonError('unknown-manifest', `manifest ${digest} is not in this transfer server's store`);
          for (const id of referencedChunks(decodeManifest(raw))) allowed.add(id);
        }
        return new Scope(allowed, unwrapLineageKeys(opts.masterKey, Buffer.from(t.wrappedKeys, 'base64'), t.keyContext));
      })();
      scopes.set(key, scope);
      scope.catch(() => scopes.delete(key));
    }
    return scope;
  };

  const authorize = async (req: FastifyRequest, direction?: 'download' | 'upload') => {
    const header = req.headers.authorization ?? '';
    if (!header.startsWith('Ticket ')) throw new TicketError('malformed', 'missing "Authorization: Ticket …" header');
    const ticket = verifyTicket(header.slice(7), opts.brokerPublicKey, { now: new Date(), serverId: opts.id });
    if (direction && ticket.direction !== direction) throw new CarryonError('wrong-direction', `ticket is for ${ticket.direction}, not ${direction}`);
    return { ticket, scope: await loadScope(ticket) };
  };

  /** Holds one of the ticket's streams for the duration of a request; 429 past maxStreams. */
  const holdStream = (t: TicketPayload, reply: FastifyReply): (() => void) | null => {
    const n = streams.get(t.jobId) ?? 0;
    if (n >= t.maxStreams) {
      void reply.status(429).header('retry-after', '1').send({ error: 'too-many-streams', message: `ticket allows ${t.maxStreams} concurrent streams` });
      return null;
    }
    streams.set(t.jobId, n + 1);
    let released = false;
    return () => {
      if (released) return;
      released = true;
      const left = (streams.get(t.jobId) ?? 1) - 1;
      if (left <= 0) streams.delete(t.jobId);
      else streams.set(t.jobId, left);
    };
  };

  app.get('/v1/health', async () => ({ id: opts.id, slots: opts.slots }));

  app.post('/v1/chunks/missing', async (req) => {
    const { ticket, scope } = await authorize(req);
    const { ids } = IdList(4096).parse(req.body);
    const outside = ids.find((id) => !scope.allowed.has(id));
    if (outside) throw new CarryonError('out-of-scope', `chunk ${outside} is not referenced by the ticket's manifests`);
    void ticket;
    return { missing: await opts.store.missing(ids) };
  });

  app.post('/v1/chunks/fetch', async (req, reply) => {
    const { ticket, scope } = await authorize(req, 'download');
    const { ids } = IdList(256).parse(req.body);
    const release = holdStream(ticket, reply);
    if (!release) return reply;
    const out = new PassThrough();
    const js = jobStats(ticket.jobId);
    void (async () => {
      try {
        for (const id of ids) {
          if (out.destroyed) break;
          let frame: Buffer;
          if (!scope.allowed.has(id)) frame = errorFrame(id, 'not referenced by the ticket');
          else {
            const blob = await opts.store.get(id);
            if (!blob) frame = errorFrame(id, 'not in store');
            else {
              frame = blobFrame(id, opts.tamper ? opts.tamper(id, blob) : blob);
              js.chunksOut++;
            }
          }
          stats.bytesOut += frame.length;
          js.bytesOut += frame.length;
          if (!out.write(frame)) await new Promise((r) => out.once('drain', r));
        }
        out.end(endFrame());
      } catch (err) {
        out.destroy(err as Error);
      } finally {
        release();
      }
    })();
    out.on('close', release);
    return reply.type('application/octet-stream').send(out);
  });

  app.post('/v1/chunks/push', async (req, reply) => {
    const { ticket, scope } = await authorize(req, 'upload');
    const release = holdStream(ticket, reply);
    if (!release) return reply;
    const js = jobStats(ticket.jobId);
    const decoder = new FrameDecoder();
    const result = { stored: 0, duplicate: 0, rejected: [] as { id: string; reason: string; code: 'invalid' | 'base-missing' }[] };
    /** The blob to store for a pushed frame: as sent, or rebuilt from a delta and sealed here. */
    const blobOf = async (frame: Extract<Frame, { type: typeof FRAME_BLOB | typeof FRAME_DELTA }>): Promise<Buffer | 'base-missing'> => {
      if (frame.type === FRAME_BLOB) {
        openBlob(scope.keys, frame.id, frame.payload);
        return frame.payload;
      }
      const baseBlob = await opts.store.get(frame.baseId);
      if (!baseBlob) return 'base-missing';
      // The stored base was verified when it arrived; the rebuilt chunk is checked against its ID.
      const base = openBlob(scope.keys, frame.baseId, baseBlob, { checkId: false });
      return sealChunk(scope.keys, openDelta(scope.keys, frame.id, frame.baseId, frame.payload, base), frame.id).blob;
    };
    try {
      for await (const piece of req.body as AsyncIterable<Buffer>) {
        stats.bytesIn += piece.length;
        js.bytesIn += piece.length;
        for (const frame of decoder.push(piece)) {
          if (frame.type !== FRAME_BLOB && frame.type !== FRAME_DELTA) continue;
          const reject = (reason: string, code: 'invalid' | 'base-missing' = 'invalid') => {
            stats.blobsRejected++;
            result.rejected.push({ id: frame.id, reason, code });
          };
          if (!scope.allowed.has(frame.id)) {
            reject('not referenced by the ticket');
            continue;
          }
          let blob: Buffer | 'base-missing';
          try {
            blob = await blobOf(frame);
          } catch (err) {
            reject((err as Error).message);
            continue;
          }
          if (blob === 'base-missing') {
            reject(`base chunk ${frame.type === FRAME_DELTA ? frame.baseId : ''} is not here: send the whole chunk`, 'base-missing');
            continue;
          }
          js.chunksIn++;
          if (await opts.store.put(frame.id, blob, { defer: true })) result.stored++;
          else result.duplicate++;
        }
      }
      decoder.finish();
      await opts.store.sync();
      return result;
    } finally {
      release();
    }
  });

  await app.listen({ host: opts.host ?? '127.0.0.1', port: opts.port ?? 0 });
  const addr = app.server.address();
  const port = typeof addr === 'object' && addr ? addr.port : opts.port;
  return {
    id: opts.id,
    url: `https://${opts.host ?? '127.0.0.1'}:${port}`,
    fingerprint: tls.fingerprint,
    slots: opts.slots,
    stats,
    close: async () => {
      await app.close();
    },
  };
}
