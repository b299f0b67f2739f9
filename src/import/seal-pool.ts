import { availableParallelism } from 'node:os';
import { Worker } from 'node:worker_threads';
import { encodeLineageKeys, type LineageKeys } from '../core/keys.js';
import type { RecycleRequest, SealRequest, SealResult } from './seal-worker.js';

/** A fixed pool of sealing workers; each job goes to the least busy worker. */
export class SealPool {
  private readonly workers: { worker: Worker; busy: number }[] = [];
  private readonly waiting = new Map<number, { resolve: (r: SealResult) => void; reject: (e: Error) => void }>();
  private seq = 0;
  private failure: Error | null = null;

  constructor(keys: LineageKeys, size = availableParallelism()) {
    for (let i = 0; i < Math.max(1, size); i++) {
      const worker = new Worker(new URL('./seal-worker.js', import.meta.url), {
        workerData: { keys: encodeLineageKeys(keys) },
      });
      const slot = { worker, busy: 0 };
      worker.on('message', (res: SealResult) => {
        slot.busy--;
        const w = this.waiting.get(res.seq);
        this.waiting.delete(res.seq);
        w?.resolve(res);
      });
      worker.on('error', (err) => this.fail(err));
      this.workers.push(slot);
    }
  }

  /**
   * Seals consecutive chunks held in `data` (ownership of its buffer moves to the worker), or
   * read by the worker from a range of a raw file.
   */
  seal(data: Uint8Array | { file: string; offset: number; length: number }, chunkSize: number): Promise<SealResult> {
    if (this.failure) return Promise.reject(this.failure);
    const slot = this.workers.reduce((a, b) => (b.busy < a.busy ? b : a));
    const seq = this.seq++;
    let payload: SealRequest['data'];
    if (data instanceof Uint8Array) {
      const exact = data.byteOffset === 0 && data.byteLength === data.buffer.byteLength ? data : data.slice();
      payload = exact.buffer as ArrayBuffer;
    } else payload = data;
    const req: SealRequest = { seq, data: payload, chunkSize };
    slot.busy++;
    return new Promise((resolve, reject) => {
      this.waiting.set(seq, { resolve, reject });
      slot.worker.postMessage(req, payload instanceof ArrayBuffer ? [payload] : []);
    });
  }

  /**
   * Hands a result's blob buffer back for reuse. Only once nothing refers to its blobs any more:
   * stores copy or write a blob before their put resolves.
   */
  recycle(buffer: ArrayBuffer): void {
    if (this.failure || buffer.byteLength === 0) return;
    const slot = this.workers.reduce((a, b) => (b.busy < a.busy ? b : a));
    slot.worker.postMessage({ recycle: buffer } satisfies RecycleRequest, [buffer]);
  }

  private fail(err: Error): void {
    this.failure = err;
    for (const w of this.waiting.values()) w.reject(err);
    this.waiting.clear();
  }

  async close(): Promise<void> {
    await Promise.all(this.workers.map((w) => w.worker.terminate()));
  }
}
