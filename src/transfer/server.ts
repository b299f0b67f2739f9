import type { KeyObject } from 'node:crypto';
import Fastify, { type FastifyInstance, type FastifyReply, type FastifyRequest } from 'fastify';
import { PassThrough } from 'node:stream';
import { z } from 'zod';
import { isChunkId, type ChunkId } from '../core/chunk-id.js';
import { CarryonError } from '../core/errors.js';
import { TicketError, verifyTicket, type TicketPayload } from '../core/tokens/ticket.js';
import { acceptOnlyOurMediaTypes, drainRefusedBody } from '../net/body-limits.js';
import { mapError, parseOrInvalid } from '../net/http-errors.js';
import { closePromptly } from '../net/close-server.js';
import { loadOrCreateTls } from '../net/tls-cert.js';
import { getBlobs, type ChunkStore } from '../store/chunk-store.js';
import { endFrame, errorFrame, FRAME_BLOB, FRAME_DELTA, FRAME_DELTA_CHAIN, frameHeader } from '../core/chunks/frames.js';
import { deltaRecordBase, deltaRecordId, encodeDeltaChain, MAX_CHAIN, ZERO_BASE } from '../core/chunks/delta-record.js';
import { MAX_BLOB_SIZE } from '../core/chunks/blob.js';
import { PushChecks } from './push-checks.js';
import { PushSession } from './push-session.js';
import { DeltaKeeper } from './delta-keeper.js';
import { JobScopes, type JobSummary } from './scopes.js';
import { receiptKey } from '../core/tokens/push-receipt.js';
import { verifyRevocation } from '../core/tokens/revocation.js';

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
  /** Test hook: the clock for ticket expiry and eviction. */
  now?: () => number;
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
  /** Replaces the broker's revocation list: those jobs' tickets are refused from now on. */
  setRevoked(jobIds: Iterable<string>): void;
  /** Adds revocations (pushed by the broker as jobs end, `POST /v1/revoke`): refused from now on. */
  addRevoked(jobIds: Iterable<string>): void;
  /** Per-job summaries of chunk access for jobs evicted since the last call (for the broker's audit). */
  drainSummaries(): JobSummary[];
  /** Evicts jobs whose tickets expired (also done on its own, at most once a second and every 30 s). */
  sweep(): void;
  /** Resolves once the delta records of pushes answered so far are in the store (tests). */
  deltasSettled(): Promise<void>;
  /** Per-job state held now: stays flat however many jobs come and go. */
  retained(): { scopes: number; revoked: number; pendingSummaries: number; checkoutSets: number; jobCounters: number; streams: number };
  close(): Promise<void>;
}

/** Blobs a fetch reads ahead of what it sends (≤ 8 MiB of 256 KiB chunks). */
const FETCH_WINDOW = 32;

const Id = z.string().refine(isChunkId, 'not a chunk ID');
/** `have[i]`: the chunk the asker holds where it wants `ids[i]` (null: none), so the server may send pages instead. */
const FetchBody = z.object({ ids: z.array(Id).max(256), have: z.array(Id.nullable()).max(256).optional() }).strict()
  .refine((b) => !b.have || b.have.length === b.ids.length, 'have must list one entry (or null) per id');

/** What a fetch sends for a chunk: its blob, or the delta record for the base the asker holds; null: not in the store. */
type Outgoing = { type: typeof FRAME_BLOB | typeof FRAME_DELTA | typeof FRAME_DELTA_CHAIN; bytes: Buffer } | Error | null;

/**
 * Reads one window of a fetch: first the delta records of the chunks whose base the asker holds,
 * then the blobs of the rest (no record, or chain of records, leading to that base means the blob). A
 * store that cannot read one (truncated pack, bad index) fails that chunk with its reason; the
 * stream and the other chunks go on (the client may try elsewhere).
 */
async function readWindow(store: ChunkStore, ids: ChunkId[] | undefined, bases: ReadonlyMap<ChunkId, ChunkId>, deltas: DeltaKeeper): Promise<Map<ChunkId, Outgoing>> {
  const sends = new Map<ChunkId, Outgoing>();
  if (!ids) return sends;
  const read = (list: ChunkId[]) => getBlobs(store, list).catch(() => Promise.all(list.map((id) => store.get(id).catch((err: Error) => new Error(`transfer server store error: ${err.message}`)))));
  // From each wanted chunk back through its records (at most MAX_CHAIN) to the base the asker holds:
  // one record (FRAME_DELTA), or a chain for a copy parked further back; the chunk when none leads there
  // or the chain would outweigh it. Held records (pushes that just answered) first, the store for the rest.
  let walking = ids.filter((id) => bases.has(id)).map((id) => ({ id, at: id, steps: [] as { newId: ChunkId; record: Buffer }[], bytes: 1 }));
  for (let depth = 0; depth < MAX_CHAIN && walking.length; depth++) {
    const recordIds = walking.map((w) => deltaRecordId(w.at));
    const held = recordIds.map((r) => deltas.get(r));
    const stored = await read(recordIds.filter((_, i) => !held[i]));
    const next: typeof walking = [];
    walking.forEach((w, i) => {
      const r = held[i] ?? stored.shift() ?? null;
      const from = r && !(r instanceof Error) ? deltaRecordBase(r) : null;
      if (!r || r instanceof Error || !from) return;
      w.steps.unshift({ newId: w.at, record: r });
      w.bytes += 36 + r.length;
      if (w.bytes > MAX_BLOB_SIZE) return;
      if (from === bases.get(w.id)) {
        sends.set(w.id, w.steps.length === 1 ? { type: FRAME_DELTA, bytes: r } : { type: FRAME_DELTA_CHAIN, bytes: encodeDeltaChain(w.steps) });
      } else if (from !== ZERO_BASE) {
        w.at = from;
        next.push(w);
      }
    });
    walking = next;
  }
  const rest = ids.filter((id) => !sends.has(id));
  const blobs = rest.length ? await read(rest) : [];
  rest.forEach((id, i) => {
    const b = blobs[i] ?? null;
    sends.set(id, b === null || b instanceof Error ? b : { type: FRAME_BLOB, bytes: b });
  });
  return sends;
}

/**
 * Stateless transfer server: trusts a ticket by the broker's signature alone, then serves exactly
 * the chunks the ticket's manifests reference, and names the chunks a check-in sends as pages
 * (rebuilt on the checkpoint's chunks). Blobs travel as stored. Nothing is accepted under an ID
 * the sender gives: every chunk stored here was named here (decision 53).
 */
export async function startTransferServer(opts: TransferServerOptions): Promise<TransferServer> {
  const tls = await loadOrCreateTls({ dir: opts.tlsDir });
  const app: FastifyInstance = Fastify({ https: { cert: tls.cert, key: tls.key }, bodyLimit: 64 * 1024 * 1024, logger: false });
  const stats: TransferStats = { bytesIn: 0, bytesOut: 0, blobsRejected: 0, perJob: new Map() };
  const now = opts.now ?? Date.now;
  const streams = new Map<string, number>();
  const scopes = new JobScopes(opts.store, opts.masterKey, now, (jobId) => stats.perJob.delete(jobId));
  const checks = new PushChecks();
  checks.warm();
  const deltas = new DeltaKeeper(opts.store);
  const receipts = receiptKey(opts.masterKey);
  const sweeper = setInterval(() => scopes.sweep(), 30_000);
  sweeper.unref();

  app.addContentTypeParser('application/octet-stream', (_req, payload, done) => done(null, payload));
  // The same error → status mapping as the broker (src/net/http-errors.ts).
  acceptOnlyOurMediaTypes(app);
  app.setErrorHandler((err, req, reply) => {
    const m = mapError(err);
    if (reply.sent || reply.raw.headersSent) return;
    if (m.status === 413) drainRefusedBody(req, reply);
    void reply.status(m.status).type('application/json').send({ error: m.code, message: m.message });
  });

  const authorize = async (req: FastifyRequest, direction?: 'download' | 'upload') => {
    const header = req.headers.authorization ?? '';
    if (!header.startsWith('Ticket ')) throw new TicketError('malformed', 'missing "Authorization: Ticket …" header');
    const ticket = verifyTicket(header.slice(7), opts.brokerPublicKey, { now: new Date(now()), serverId: opts.id });
    if (direction && ticket.direction !== direction) throw new CarryonError('wrong-direction', `ticket is for ${ticket.direction}, not ${direction}`);
    const { scope, counters } = scopes.get(ticket);
    // The per-job counters live as long as the job's scope (evicted together).
    stats.perJob.set(ticket.jobId, counters);
    return { ticket, scope: await scope, js: counters };
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

  // The broker pushes the jobs that just ended (a cancel, a cut-off), signed for this server: their
  // tickets stop at once instead of at the next heartbeat.
  app.post('/v1/revoke', async (req) => {
    const { revocation } = parseOrInvalid(z.object({ revocation: z.string().min(1).max(8 * 1024 * 1024) }).strict(), req.body);
    const jobIds = verifyRevocation(revocation, opts.brokerPublicKey, opts.id);
    scopes.addRevoked(jobIds);
    return { ok: true, revoked: jobIds.length };
  });

  app.post('/v1/chunks/fetch', async (req, reply) => {
    const { ticket, scope, js } = await authorize(req, 'download');
    const { ids, have } = parseOrInvalid(FetchBody, req.body);
    const release = holdStream(ticket, reply);
    if (!release) return reply;
    // The base the laptop holds for each wanted chunk (a parked copy's): sent as pages where a record says how.
    const bases = new Map<ChunkId, ChunkId>();
    have?.forEach((x, i) => x && x !== ids[i] && bases.set(ids[i]!, x));
    const out = new PassThrough();
    void (async () => {
      try {
        // Windows of blobs read ahead while the previous one is sent (an object store answers a
        // window with a few ranged GETs instead of one request per blob).
        const allowed = ids.filter((id) => scope.allowed.has(id));
        const windows: ChunkId[][] = [];
        for (let i = 0; i < allowed.length; i += FETCH_WINDOW) windows.push(allowed.slice(i, i + FETCH_WINDOW));
        const sends = new Map<ChunkId, Outgoing>();
        let ahead = readWindow(opts.store, windows[0], bases, deltas);
        let w = 0;
        for (const id of ids) {
          if (out.destroyed) break;
          // A blob goes as header, then the blob itself: joining them copied every byte once more.
          let parts: Buffer[];
          if (!scope.allowed.has(id)) parts = [errorFrame(id, 'not referenced by the ticket')];
          else {
            // The window holding this id's position is at most a few ahead (duplicates may skip some).
            while (!sends.has(id) && w < windows.length) {
              sends.clear();
              for (const [x, o] of await ahead) sends.set(x, o);
              ahead = readWindow(opts.store, windows[++w], bases, deltas);
            }
            const o = sends.get(id) ?? null;
            if (!o) parts = [errorFrame(id, 'not in store')];
            else if (o instanceof Error) parts = [errorFrame(id, o.message)];
            else {
              const sent = opts.tamper ? opts.tamper(id, o.bytes) : o.bytes;
              parts = [frameHeader(o.type, id, sent.length), sent];
              js.chunksOut++;
            }
          }
          let writable = true;
          for (const part of parts) {
            stats.bytesOut += part.length;
            js.bytesOut += part.length;
            writable = out.write(part);
          }
          if (!writable) await new Promise((r) => out.once('drain', r));
        }
        ahead.catch(() => undefined);
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
    const { ticket, scope, js } = await authorize(req, 'upload');
    if (!req.body || typeof (req.body as AsyncIterable<Buffer>)[Symbol.asyncIterator] !== 'function') {
      throw new CarryonError('invalid', 'push needs an application/octet-stream body of frames');
    }
    const release = holdStream(ticket, reply);
    if (!release) return reply;
    try {
      return await new PushSession({ store: opts.store, scope, ticket, checks, receipts, deltas, counters: js, stats }).run(req.body as AsyncIterable<Buffer>);
    } finally {
      // Refused before the body's end (a bad frame): the rest is never read, so the connection
      // cannot carry another request; without this a client reusing it waited ≈ 73 s for a reset.
      if (!req.raw.complete) void reply.header('connection', 'close');
      // The session settled its checks and puts before the stream is given back.
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
    setRevoked: (ids) => scopes.setRevoked(ids),
    addRevoked: (ids) => scopes.addRevoked(ids),
    drainSummaries: () => scopes.drainSummaries(),
    sweep: () => scopes.sweep(),
    deltasSettled: () => deltas.settled(),
    retained: () => ({ ...scopes.sizes(), jobCounters: stats.perJob.size, streams: streams.size }),
    close: async () => {
      clearInterval(sweeper);
      await closePromptly(app);
      await checks.close();
      await deltas.settled();
    },
  };
}
