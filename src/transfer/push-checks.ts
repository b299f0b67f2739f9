import { availableParallelism } from 'node:os';
import type { ChunkId } from '../core/chunk-id.js';
import { encodeLineageKeys, type LineageKeys } from '../core/keys.js';
import { WorkerPool } from '../core/worker-pool.js';
import type { PushCheckReply, PushCheckRequest } from './push-worker.js';

/**
 * The CPU of accepting pushed chunks (GCM, zstd, HMAC; for a delta also applying it and sealing
 * the rebuilt chunk) on worker threads, so a check-in's chunks are checked on every core while
 * the main thread reads the streams and writes the store. Threads start at the first push.
 */
export class PushChecks {
  private pool: WorkerPool<Omit<PushCheckRequest, 'seq'>, PushCheckReply> | null = null;
  private readonly encoded = new WeakMap<LineageKeys, string>();

  constructor(private readonly size = Math.min(8, availableParallelism())) {}

  /** Authenticates a pushed blob against its ID; rejects with the reason it fails. The caller keeps `blob` (a copy travels). */
  async verify(keys: LineageKeys, id: ChunkId, blob: Uint8Array): Promise<void> {
    const payload = copyOf(blob);
    await this.workers().run({ keys: this.encode(keys), id, payload }, [payload]);
  }

  /** Applies a delta to its base chunk's stored blob, checks the result against `id`, and returns the sealed chunk. */
  async rebuild(keys: LineageKeys, id: ChunkId, delta: Uint8Array, base: { id: ChunkId; blob: Uint8Array }): Promise<Buffer> {
    const payload = copyOf(delta);
    const baseBlob = copyOf(base.blob);
    const reply = await this.workers().run({ keys: this.encode(keys), id, payload, base: { id: base.id, blob: baseBlob } }, [payload, baseBlob]);
    if (!reply.blob) throw new Error(`rebuilding chunk ${id} gave no blob`);
    return Buffer.from(reply.blob);
  }

  async close(): Promise<void> {
    await this.pool?.close();
    this.pool = null;
  }

  private workers(): WorkerPool<Omit<PushCheckRequest, 'seq'>, PushCheckReply> {
    this.pool ??= new WorkerPool(new URL('./push-worker.js', import.meta.url), null, this.size);
    return this.pool;
  }

  private encode(keys: LineageKeys): string {
    let text = this.encoded.get(keys);
    if (!text) this.encoded.set(keys, (text = encodeLineageKeys(keys)));
    return text;
  }
}

/** A copy to transfer: the caller's buffers (a frame it will store, a blob a store may cache) stay whole. */
function copyOf(bytes: Uint8Array): ArrayBuffer {
  return new Uint8Array(bytes).buffer as ArrayBuffer;
}
