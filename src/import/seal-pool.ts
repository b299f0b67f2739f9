import { availableParallelism } from 'node:os';
import { encodeLineageKeys, type LineageKeys } from '../core/keys.js';
import { exactBuffer, WorkerPool } from '../core/worker-pool.js';
import type { RecycleRequest, SealRequest, SealResult } from './seal-worker.js';

/** A fixed pool of sealing workers; each job goes to the least busy worker. */
export class SealPool {
  private readonly pool: WorkerPool<Omit<SealRequest, 'seq'>, SealResult>;

  constructor(keys: LineageKeys, size = availableParallelism()) {
    this.pool = new WorkerPool(new URL('./seal-worker.js', import.meta.url), { keys: encodeLineageKeys(keys) }, size);
  }

  /**
   * Seals consecutive chunks held in `data` (ownership of its buffer moves to the worker), or
   * read by the worker from a range of a raw file.
   */
  seal(data: Uint8Array | { file: string; offset: number; length: number }, chunkSize: number): Promise<SealResult> {
    const payload = data instanceof Uint8Array ? exactBuffer(data) : data;
    return this.pool.run({ data: payload, chunkSize }, payload instanceof ArrayBuffer ? [payload] : []);
  }

  /**
   * Hands a result's blob buffer back for reuse. Only once nothing refers to its blobs any more:
   * stores copy or write a blob before their put resolves.
   */
  recycle(buffer: ArrayBuffer): void {
    if (buffer.byteLength === 0) return;
    this.pool.post({ recycle: buffer } satisfies RecycleRequest, [buffer]);
  }

  close(): Promise<void> {
    return this.pool.close();
  }
}
