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
 * the store. With size 0 they run inline. Threads start at the first push.
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

  /** Rebuilds a chunk from a pages blob and its base (null: zeros) and names it (push-rebuild `namePushed`). */
  async name(keys: LineageKeys, pages: Uint8Array, base: { id: ChunkId; blob: Uint8Array } | null, label: string, opts: { background?: boolean } = {}): Promise<Named> {
    if (this.size === 0 && !opts.background) return namePushed(keys, pages, base, label);
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
 * A core each for the main thread (TLS, store writes) and the rest of the host, the others for
 * checks (at most 8). None below 4 cores: on this 2-core box, where the laptop and QEMU share the
 * cores, two check threads made the 4 GiB check-in's upload ≈ 0.2 s slower than checking inline
 * (0.94–1.12 s inline, 1.20–1.37 s threaded, 4 runs each, alternating): the copies to and from
 * the threads and their fresh memory cost more than the second core gave. With the host otherwise
 * idle, 640 rebuilds took 0.46–0.61 s on two threads and 0.64–0.70 s on one.
 */
function defaultSize(): number {
  const spare = availableParallelism() - 2;
  return spare < 2 ? 0 : Math.min(8, spare);
}
