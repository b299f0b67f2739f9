import { availableParallelism } from 'node:os';
import type { ChunkId } from '../core/chunk-id.js';
import { encodeLineageKeys, type LineageKeys } from '../core/keys.js';
import { WorkerPool } from '../core/worker-pool.js';
import { namePushed, type Named } from './push-rebuild.js';
import type { PushCheckReply, PushCheckRequest, PushWorkerData } from './push-worker.js';

type Pool = WorkerPool<Omit<PushCheckRequest, 'seq'>, PushCheckReply>;

/**
 * The CPU of naming pushed pages (GCM, zstd, applying them to the base, HMAC, sealing the rebuilt
 * chunk, ≈ 1.2 ms per 256 KiB chunk here) on worker threads, so a server with cores
 * to spare checks its check-ins on all of them while the main thread reads the streams and writes
 * the store. With size 0 they run inline. The server starts the threads with itself (`warm`): a
 * thread's start (≈ 30 ms) is not paid by the first check-in.
 *
 * Background replicas (the agents' scheduled ones: nobody waits for them) have a lane of their own:
 * threads at nice 19 in SCHED_IDLE (idle-thread.ts), on every host, so that they never take CPU
 * from a user's check-out or check-in on this server, nor, where the server shares a machine
 * with a running guest, from the guest.
 */
export class PushChecks {
  private pool: Pool | null = null;
  private idlePool: Pool | null = null;
  private readonly encoded = new WeakMap<LineageKeys, string>();

  constructor(private readonly size = defaultSize()) {}

  /** Starts the foreground threads now (idle threads cost memory only). */
  warm(): void {
    if (this.size > 0) this.pool ??= newPool({}, this.size);
  }

  /** Rebuilds a chunk from a pages blob and its base (null: zeros) and names it (push-rebuild `namePushed`). */
  async name(keys: LineageKeys, pages: Uint8Array, base: { id: ChunkId; blob: Uint8Array } | null, label: string, opts: { background?: boolean; inline?: boolean } = {}): Promise<Named> {
    if ((this.size === 0 || opts.inline) && !opts.background) return namePushed(keys, pages, base, label);
    const payload = copyOf(pages);
    const baseBlob = base ? copyOf(base.blob) : null;
    const pool = opts.background ? (this.idlePool ??= newPool({ idle: true }, Math.max(1, this.size))) : (this.pool ??= newPool({}, this.size));
    const reply = await pool.run({ keys: this.encode(keys), id: label, payload, base: base ? { id: base.id, blob: baseBlob! } : undefined }, baseBlob ? [payload, baseBlob] : [payload]);
    return { id: reply.named ?? null, blob: reply.blob ? Buffer.from(reply.blob) : null };
  }

  async close(): Promise<void> {
    await Promise.all([this.pool?.close(), this.idlePool?.close()]);
    this.pool = null;
    this.idlePool = null;
  }

  private encode(keys: LineageKeys): string {
    let text = this.encoded.get(keys);
    if (!text) this.encoded.set(keys, (text = encodeLineageKeys(keys)));
    return text;
  }
}

function newPool(data: PushWorkerData, size: number): Pool {
  return new WorkerPool(new URL('./push-worker.js', import.meta.url), data, size);
}

/** A copy to transfer: the caller's buffers (a frame being read, a blob a store may cache) stay whole. */
function copyOf(bytes: Uint8Array): ArrayBuffer {
  return new Uint8Array(bytes).buffer as ArrayBuffer;
}

/**
 * The main thread reads the streams (TLS) and writes the store while threads rebuild and seal:
 * one thread on a host of two or three cores, one core each for the main thread and the rest of
 * the host beyond that (at most 8); inline only on a single core. Measured on this 2-core box,
 * where the laptop's check-in shares the cores: session 9 found two threads ≈ 0.2 s slower than
 * inline for the 4 GiB check-in after 1 % (the laptop then ran qemu-storage-daemon beside the
 * push); with the laptop reading its top from Node (decision 68) it is idle half the push, and
 * one thread took the upload from 850–872 to 759–783 ms, two threads 783.
 */
function defaultSize(): number {
  const cores = availableParallelism();
  return cores < 2 ? 0 : Math.min(8, Math.max(1, cores - 2));
}
