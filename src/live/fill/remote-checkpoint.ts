import type { ChunkId } from '../../core/chunk-id.js';
import { openBlob } from '../../core/chunks/blob.js';
import { chunkLength, MiB } from '../../core/chunks/chunking.js';
import { CarryonError } from '../../core/errors.js';
import type { LineageKeys } from '../../core/keys.js';
import type { Manifest } from '../../core/chunks/manifest.js';
import { fetchBlobs, type TransferSession } from '../../transfer-client/client.js';
import { pacing, type RateLimiter } from '../../transfer-client/rate-limit.js';
import { checkRange, chunkSpans, DiskError, type BlockDevice } from '../../disk/block-device.js';
import { ByteLru } from './lru.js';

export interface RemoteCheckpointOptions {
  manifest: Manifest;
  keys: LineageKeys;
  session: TransferSession;
  log: (line: string) => void;
  /** Every failure a reader sees (or nearly saw), for `carryon status`. */
  onFailure?: (message: string) => void;
  cacheBytes?: number;
  /** Chunks fetched ahead of a sequential reader (the fill job). */
  prefetchChunks?: number;
  /** Caps the download rate (`--limit-rate`); guest reads count too. */
  rateLimit?: RateLimiter;
  /**
   * Chunks this laptop holds in other desktops' copies (local-copy.ts's LocalChunkReader): asked
   * first, each one checked against its ID there; a chunk it cannot give is fetched.
   */
  local?: { has(id: ChunkId): boolean; read(id: ChunkId, length: number): Promise<Buffer | null> } | null;
  /** How long a read keeps retrying a failing link before it reports EIO (default 10 min). */
  giveUpAfterMs?: number;
}

interface Waiter {
  resolve: (b: Buffer) => void;
  reject: (e: Error) => void;
}

/** A queue of chunks to fetch, how many go in one request, and how many requests of it are running. */
interface Lane {
  queue: ChunkId[];
  batch: number;
  active: number;
}

/**
 * The checkpoint as a read-only block device whose chunks come from the transfer server as they
 * are read: the backing of a base that is still being filled. Every blob is authenticated (GCM,
 * then HMAC = ID) before a byte of it is served. Reads from the guest take a lane of their own
 * (one of the ticket's streams), so a slow link never queues them behind the sequential fill;
 * they wait and retry as long as the transfer lives, and any failure is logged and recorded.
 */
export class RemoteCheckpoint implements BlockDevice {
  readonly size: number;
  readonly readOnly = true;
  private readonly cache: ByteLru<ChunkId>;
  private readonly inflight = new Map<ChunkId, Waiter[]>();
  /** Chunks waiting to be fetched, for the guest (`demand`) and for the fill ahead of it (`prefetch`). */
  private readonly lanes: Record<'demand' | 'prefetch', Lane> = { demand: { queue: [], batch: 16, active: 0 }, prefetch: { queue: [], batch: 8, active: 0 } };
  private nextSequential = -1;
  private closed = false;
  private readonly lengthById = new Map<ChunkId, number>();
  private readonly authFailures = new Map<ChunkId, number>();
  private readonly zero: Buffer;
  fetchedBytes = 0;
  fetchedChunks = 0;

  constructor(private readonly opts: RemoteCheckpointOptions) {
    this.size = opts.manifest.diskSize;
    this.cache = new ByteLru(opts.cacheBytes ?? 64 * MiB);
    this.zero = Buffer.alloc(opts.manifest.chunkSize);
    opts.manifest.chunks.forEach((id, i) => {
      if (id) this.lengthById.set(id, chunkLength(i, opts.manifest.diskSize, opts.manifest.chunkSize));
    });
  }

  private get streams(): number {
    return Math.max(1, this.opts.session.endpoint.maxStreams);
  }

  async read(offset: number, length: number): Promise<Buffer> {
    if (this.closed) throw new DiskError('closed', 'remote checkpoint is closed');
    checkRange(this.size, offset, length);
    const spans = chunkSpans(this.opts.manifest.chunkSize, offset, length);
    const first = spans[0]!.index;
    const last = spans[spans.length - 1]!.index;
    const sequential = first === this.nextSequential || first === this.nextSequential - 1;
    this.nextSequential = last + 1;
    const parts = spans.map((s) => this.chunk(s.index, sequential ? 'prefetch' : 'demand'));
    if (sequential) this.prefetchFrom(last + 1);
    const out = Buffer.allocUnsafe(length);
    const bufs = await Promise.all(parts);
    spans.forEach((s, k) => bufs[k]!.copy(out, s.outOff, s.inChunk, s.inChunk + s.len));
    return out;
  }

  async write(): Promise<void> {
    throw new DiskError('read-only', 'the remote checkpoint is read-only');
  }
  async writeZeroes(): Promise<void> {
    throw new DiskError('read-only', 'the remote checkpoint is read-only');
  }
  async trim(): Promise<void> {
    throw new DiskError('read-only', 'the remote checkpoint is read-only');
  }
  async flush(): Promise<void> {}

  async close(): Promise<void> {
    this.closed = true;
    const err = new DiskError('closed', 'remote checkpoint closed');
    for (const ws of this.inflight.values()) for (const w of ws) w.reject(err);
    this.inflight.clear();
    this.cache.clear();
  }

  private chunk(index: number, lane: 'demand' | 'prefetch'): Promise<Buffer> {
    const id = this.opts.manifest.chunks[index] ?? null;
    if (id === null) return Promise.resolve(this.zero.subarray(0, chunkLength(index, this.size, this.opts.manifest.chunkSize)));
    const hit = this.cache.get(id);
    if (hit) return Promise.resolve(hit);
    return new Promise((resolve, reject) => {
      const waiting = this.inflight.get(id);
      if (waiting) {
        waiting.push({ resolve, reject });
        // A guest now waits on a chunk the fill only queued: move it to the front.
        if (lane === 'demand') this.promote(id);
        return;
      }
      this.inflight.set(id, [{ resolve, reject }]);
      this.begin(id, lane);
    });
  }

  /** Starts getting an in-flight chunk: from a local copy where one holds it, else from the transfer server. */
  private begin(id: ChunkId, lane: 'demand' | 'prefetch'): void {
    if (this.opts.local?.has(id)) return void this.fromLocal(id, lane);
    this.lanes[lane].queue.push(id);
    this.pump();
  }

  private async fromLocal(id: ChunkId, lane: 'demand' | 'prefetch'): Promise<void> {
    const plain = await this.opts.local!.read(id, this.lengthById.get(id)!).catch(() => null);
    if (!this.inflight.has(id)) return; // closed meanwhile
    if (!plain) {
      this.lanes[lane].queue.push(id);
      return void this.pump();
    }
    this.cache.set(id, plain);
    for (const w of this.inflight.get(id) ?? []) w.resolve(plain);
    this.inflight.delete(id);
  }

  private promote(id: ChunkId): void {
    const at = this.lanes.prefetch.queue.indexOf(id);
    if (at < 0) return;
    this.lanes.prefetch.queue.splice(at, 1);
    this.lanes.demand.queue.push(id);
    this.pump();
  }

  private prefetchFrom(start: number): void {
    const window = this.opts.prefetchChunks ?? 32;
    const chunks = this.opts.manifest.chunks;
    for (let i = start; i < Math.min(chunks.length, start + window); i++) {
      const id = chunks[i];
      if (!id || this.cache.has(id) || this.inflight.has(id)) continue;
      this.inflight.set(id, []);
      if (this.opts.local?.has(id)) void this.fromLocal(id, 'prefetch');
      else this.lanes.prefetch.queue.push(id);
    }
    this.pump();
  }

  /** Demand reads get one stream of their own; the fill gets the rest (at least one). */
  private pump(): void {
    const demandStreams = 1;
    this.drive(this.lanes.demand, demandStreams);
    // Under a cap the fill asks for a quarter second's worth at a time (see pacing()).
    const fill = pacing(this.opts.rateLimit, this.opts.manifest.chunkSize, Math.max(1, this.streams - demandStreams), this.lanes.prefetch.batch);
    this.drive(this.lanes.prefetch, fill.streams, fill.batch);
  }

  /** Starts fetches from the lane's queue, a batch each, until it runs `streams` of them. */
  private drive(lane: Lane, streams: number, batchSize = lane.batch): void {
    while (lane.queue.length && lane.active < streams) {
      const batch = lane.queue.splice(0, batchSize);
      lane.active++;
      void this.fetch(batch).finally(() => {
        lane.active--;
        this.pump();
      });
    }
  }

  /** Fetches a batch until every chunk in it is authenticated and delivered, retrying a failing link. */
  private async fetch(ids: ChunkId[]): Promise<void> {
    const started = Date.now();
    let pending = ids.filter((id) => this.inflight.has(id));
    for (let attempt = 0; pending.length && !this.closed; attempt++) {
      try {
        for await (const { id, blob } of fetchBlobs(this.opts.session, pending)) {
          if (!this.inflight.has(id)) continue;
          let plain: Buffer;
          try {
            plain = openBlob(this.opts.keys, id, blob);
            if (plain.length !== this.lengthById.get(id)) throw new CarryonError('bad-blob', `chunk ${id.slice(0, 12)}… has ${plain.length} bytes, expected ${this.lengthById.get(id)}`);
          } catch (err) {
            const message = `chunk ${id.slice(0, 12)}… failed authentication and was refused: ${(err as Error).message}`;
            this.opts.log(message);
            this.opts.onFailure?.(message);
            const fails = (this.authFailures.get(id) ?? 0) + 1;
            this.authFailures.set(id, fails);
            if (fails >= 3) {
              const bad = new DiskError('io', `chunk ${id.slice(0, 12)}… failed authentication ${fails} times`);
              for (const w of this.inflight.get(id) ?? []) w.reject(bad);
              this.inflight.delete(id);
            }
            continue; // stays pending: fetched again below
          }
          this.fetchedBytes += blob.length;
          this.fetchedChunks++;
          await this.opts.rateLimit?.take(blob.length);
          this.cache.set(id, plain);
          for (const w of this.inflight.get(id) ?? []) w.resolve(plain);
          this.inflight.delete(id);
        }
      } catch (err) {
        this.opts.log(`fetching ${pending.length} chunks failed (attempt ${attempt + 1}): ${(err as Error).message}`);
      }
      pending = pending.filter((id) => this.inflight.has(id));
      // Past the budget the readers get EIO (reported once below), not an endless wait.
      if (pending.length && Date.now() - started > (this.opts.giveUpAfterMs ?? 600_000)) break;
      if (pending.length) await new Promise((r) => setTimeout(r, Math.min(10_000, 250 * 2 ** Math.min(attempt, 6))));
    }
    const err = new DiskError('io', `${pending.length} chunks could not be fetched from the transfer server`);
    for (const id of pending) {
      for (const w of this.inflight.get(id) ?? []) w.reject(err);
      this.inflight.delete(id);
    }
    if (pending.length && !this.closed) this.opts.onFailure?.(err.message);
  }
}
