import { Readable } from 'node:stream';
import { EventEmitter } from 'node:events';
import { Agent, request } from 'undici';
import { openBlob } from '../core/chunks/blob.js';
import type { ChunkId } from '../core/chunk-id.js';
import { CarryonError } from '../core/errors.js';
import type { LineageKeys } from '../core/keys.js';
import { pinnedAgent } from '../net/pinned-agent.js';
import type { ChunkStore } from '../store/chunk-store.js';
import type { RateLimiter } from './rate-limit.js';
import { FRAME_BLOB, FRAME_DELTA, FRAME_DELTA_CHAIN, FRAME_ERROR, FrameDecoder } from '../core/chunks/frames.js';

export interface TransferEndpoint {
  url: string;
  fingerprint: string;
  /** Through a gateway: the SNI name that routes to this transfer server (url is the gateway's). */
  servername?: string;
  ticket: string;
  maxStreams: number;
}

export interface Progress {
  bytesDone: number;
  chunksDone: number;
  chunksTotal: number;
  rate: number;
  etaSeconds: number | null;
  /** Check-outs: plaintext bytes of the disks being filled present locally, and that are not holes (src/live/fill/local-progress.ts). */
  bytesLocal?: number;
  bytesTotal?: number;
  /** Check-outs: chunks copied from this laptop's own copies of clones instead of fetched (counted in bytesLocal, not in chunksDone). */
  chunksCopied?: number;
}

export interface TransferOptions {
  endpoint: TransferEndpoint;
  ids: readonly ChunkId[];
  localStore?: ChunkStore;
  keys: LineageKeys;
  streams?: number;
  batchSize?: number;
  signal?: AbortSignal;
  onProgress?: (p: Progress) => void;
  /** Called when the ticket is refused as expired: returns a fresh endpoint (same job). */
  renew?: () => Promise<TransferEndpoint>;
  maxRetries?: number;
  /** Caps the bytes per second of all streams together (`--limit-rate`). */
  rateLimit?: RateLimiter;
}

export interface TransferResult {
  chunksMoved: number;
  bytesMoved: number;
  /** Blobs that failed verification and were fetched again. */
  refetched: number;
}

export class TransferFailed extends CarryonError {
  constructor(message: string, readonly status?: number) {
    super('transfer-failed', message);
  }
}

/** A session with one transfer server: the pinned connection pool and the current ticket. */
export class TransferSession extends EventEmitter {
  private agent: Agent;
  /** The server refused `have` in a fetch (older than delta records): not sent again. */
  refusesBases = false;
  constructor(public endpoint: TransferEndpoint, private readonly renew?: () => Promise<TransferEndpoint>) {
    super();
    this.agent = sessionAgent(endpoint);
  }

  /** `body` as a function: a stream made anew for each attempt (a retry cannot replay a used one). */
  async call(path: string, body: string | Buffer | (() => AsyncIterable<Buffer>), signal?: AbortSignal): Promise<{ status: number; body: AsyncIterable<Buffer> & { json(): Promise<unknown>; text(): Promise<string> } }> {
    for (let attempt = 0; attempt < 50; attempt++) {
      if (signal?.aborted) throw new CarryonError('aborted', 'transfer paused or cancelled');
      const res = await request(`${this.endpoint.url}${path}`, {
        method: 'POST',
        dispatcher: this.agent,
        signal,
        headers: {
          authorization: `Ticket ${this.endpoint.ticket}`,
          'content-type': typeof body === 'string' ? 'application/json' : 'application/octet-stream',
        },
        body: typeof body === 'function' ? Readable.from(body()) : body,
      });
      if (res.statusCode === 429) {
        await res.body.dump();
        await sleep(Number(res.headers['retry-after'] ?? 1) * 200, signal);
        continue;
      }
      if (res.statusCode === 401 && this.renew) {
        const text = await res.body.text();
        if (!text.includes('ticket-expired')) throw new TransferFailed(`transfer server refused the ticket: ${text}`, 401);
        await this.setEndpoint(await this.renew());
        continue;
      }
      if (res.statusCode >= 400) throw new TransferFailed(`transfer server answered ${res.statusCode}: ${await res.body.text()}`, res.statusCode);
      return { status: res.statusCode, body: res.body };
    }
    throw new TransferFailed('transfer server stayed busy');
  }

  async setEndpoint(e: TransferEndpoint): Promise<void> {
    if (e.url !== this.endpoint.url || e.fingerprint !== this.endpoint.fingerprint || e.servername !== this.endpoint.servername) {
      await this.agent.close();
      this.agent = sessionAgent(e);
      this.refusesBases = false;
    }
    this.endpoint = e;
  }

  close(): Promise<void> {
    return this.agent.close();
  }
}

/** Pinned to the server's own certificate; through a gateway, presenting its name. */
function sessionAgent(e: TransferEndpoint): Agent {
  return pinnedAgent(e.fingerprint, { connections: e.maxStreams, ...(e.servername ? { servername: e.servername } : {}) });
}

function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    const t = setTimeout(resolve, ms);
    signal?.addEventListener('abort', () => { clearTimeout(t); resolve(); }, { once: true });
  });
}

export function progressTracker(total: number, onProgress?: (p: Progress) => void) {
  const start = Date.now();
  const state = { bytesDone: 0, chunksDone: 0 };
  return {
    state,
    add(bytes: number, chunks: number) {
      state.bytesDone += bytes;
      state.chunksDone += chunks;
      const secs = (Date.now() - start) / 1000;
      const rate = secs > 0 ? state.bytesDone / secs : 0;
      const perChunk = state.chunksDone ? state.bytesDone / state.chunksDone : 0;
      const eta = rate > 0 ? ((total - state.chunksDone) * perChunk) / rate : null;
      onProgress?.({ ...state, chunksTotal: total, rate, etaSeconds: eta });
    },
  };
}

/** Runs `worker` over batches of `ids` with `streams` in parallel. */
export async function inBatches<T>(ids: readonly T[], batchSize: number, streams: number, worker: (batch: T[]) => Promise<void>): Promise<void> {
  let next = 0;
  await Promise.all(
    Array.from({ length: Math.max(1, streams) }, async () => {
      while (next < ids.length) {
        const batch = ids.slice(next, next + batchSize);
        next += batchSize;
        await worker(batch);
      }
    }),
  );
}

/**
 * Makes received blobs durable in groups: after every 512 chunks or 2 seconds, whichever comes
 * first, one sync for all streams (one syncfs instead of hundreds of fsyncs). An interrupted
 * transfer keeps everything up to the last group and fetches the rest again.
 */
function groupSync(store: ChunkStore, everyChunks = 512, everyMs = 2000) {
  let since = 0;
  let last = Date.now();
  let running: Promise<void> | null = null;
  return {
    async after(chunks: number): Promise<void> {
      since += chunks;
      if (running) return running;
      if (since < everyChunks && Date.now() - last < everyMs) return;
      since = 0;
      last = Date.now();
      running = store.sync().finally(() => (running = null));
      return running;
    },
  };
}

/**
 * Pulls `ids` the local store lacks. Every blob is authenticated before it is stored; a bad one
 * is refused and fetched again (bounded). Resumable by construction: ask again what is missing.
 */
/** Batches of up to 64 (or `wanted`), but at least one per stream: both ends seal and check frames one at a time per stream. */
export function batchSizeFor(count: number, streams: number, wanted = 64): number {
  return Math.max(1, Math.min(wanted, Math.ceil(count / streams)));
}

export async function downloadChunks(opts: TransferOptions & { localStore: ChunkStore }, shared?: TransferSession): Promise<TransferResult> {
  const session = shared ?? new TransferSession(opts.endpoint, opts.renew);
  const want = await opts.localStore.missing(opts.ids);
  const tracker = progressTracker(want.length, opts.onProgress);
  const result: TransferResult = { chunksMoved: 0, bytesMoved: 0, refetched: 0 };
  let queue = want;
  const maxRetries = opts.maxRetries ?? 3;
  const durable = groupSync(opts.localStore);
  try {
    for (let round = 0; queue.length && round <= maxRetries; round++) {
      const failed: ChunkId[] = [];
      const streams = opts.streams ?? session.endpoint.maxStreams;
      await inBatches(queue, batchSizeFor(queue.length, streams, opts.batchSize), streams, async (batch) => {
        const res = await session.call('/v1/chunks/fetch', JSON.stringify({ ids: batch }), opts.signal);
        const decoder = new FrameDecoder();
        const seen = new Set<ChunkId>();
        for await (const piece of res.body) {
          for (const frame of decoder.push(piece)) {
            if (frame.type === FRAME_ERROR) throw new TransferFailed(`server could not send chunk ${frame.id}: ${frame.message}`);
            if (frame.type !== FRAME_BLOB) continue;
            seen.add(frame.id);
            try {
              openBlob(opts.keys, frame.id, frame.payload);
            } catch {
              failed.push(frame.id);
              result.refetched++;
              continue;
            }
            await opts.localStore.put(frame.id, frame.payload, { defer: true });
            // Not reading on while over the limit lets TCP push back on the sender.
            await opts.rateLimit?.take(frame.payload.length, opts.signal);
            result.chunksMoved++;
            result.bytesMoved += frame.payload.length;
            tracker.add(frame.payload.length, 1);
          }
        }
        decoder.finish();
        for (const id of batch) if (!seen.has(id)) failed.push(id);
        await durable.after(batch.length);
      });
      queue = failed;
    }
    if (queue.length) throw new TransferFailed(`${queue.length} chunks failed verification ${maxRetries + 1} times`);
    return result;
  } finally {
    await opts.localStore.sync();
    if (!shared) await session.close();
  }
}

/** One chunk now (fetch on demand while the background fill runs). */
export async function fetchOne(session: TransferSession, id: ChunkId, keys: LineageKeys, store: ChunkStore): Promise<void> {
  const res = await session.call('/v1/chunks/fetch', JSON.stringify({ ids: [id] }));
  const decoder = new FrameDecoder();
  for await (const piece of res.body) {
    for (const frame of decoder.push(piece)) {
      if (frame.type === FRAME_ERROR) throw new TransferFailed(`server could not send chunk ${id}: ${frame.message}`);
      if (frame.type === FRAME_BLOB) {
        openBlob(keys, frame.id, frame.payload);
        await store.put(frame.id, frame.payload);
      }
    }
  }
  decoder.finish();
}

/**
 * Streams the blobs of `ids` (unverified: the caller authenticates each before trusting it). A
 * blob is valid until the caller asks for the next one (the decoder reuses its buffer): copy it to keep it.
 * With `have` (the chunk the caller holds where it wants each of `ids`, or null), a chunk may come
 * as a delta record against that base instead, or a chain of them (`delta`; core/chunks/delta-record.ts).
 */
export async function* fetchBlobs(session: TransferSession, ids: readonly ChunkId[], signal?: AbortSignal, have?: readonly (ChunkId | null)[]): AsyncGenerator<{ id: ChunkId; blob: Buffer; delta: false | 'record' | 'chain' }> {
  const withBases = have?.some(Boolean) && !session.refusesBases;
  const body = (bases: boolean) => JSON.stringify(bases ? { ids, have } : { ids });
  let res;
  try {
    res = await session.call('/v1/chunks/fetch', body(!!withBases), signal);
  } catch (err) {
    // A transfer server older than `have` refuses the field (400): asked again without it, and not again.
    if (!withBases || !(err instanceof TransferFailed) || err.status !== 400 || !err.message.includes('have')) throw err;
    session.refusesBases = true;
    res = await session.call('/v1/chunks/fetch', body(false), signal);
  }
  const decoder = new FrameDecoder({ reuse: true });
  for await (const piece of res.body) {
    for (const frame of decoder.push(piece)) {
      if (frame.type === FRAME_ERROR) throw new TransferFailed(`server could not send chunk ${frame.id}: ${frame.message}`);
      if (frame.type === FRAME_BLOB) yield { id: frame.id, blob: frame.payload, delta: false };
      else if (frame.type === FRAME_DELTA || frame.type === FRAME_DELTA_CHAIN) {
        if (!withBases) throw new TransferFailed(`server sent chunk ${frame.id} as pages though no base was named`);
        yield { id: frame.id, blob: frame.payload, delta: frame.type === FRAME_DELTA ? 'record' : 'chain' };
      }
    }
  }
  decoder.finish();
}
