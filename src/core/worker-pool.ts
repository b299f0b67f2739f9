import { Worker } from 'node:worker_threads';

/** What every worker reply carries: the request it answers, and why it failed (if it did). */
export interface PoolReply {
  seq: number;
  error?: { message: string; code?: string } | null;
}

/**
 * A fixed set of worker threads running one script; each request goes to the least busy one and
 * its reply (matched by `seq`) settles the caller's promise. A reply with `error` rejects with
 * that message (and its `code`, e.g. ENOSPC). A worker that dies fails every request in flight
 * and every later one: the pool is not restarted behind its user's back.
 */
export class WorkerPool<Req extends object, Res extends PoolReply> {
  private readonly workers: { worker: Worker; busy: number }[] = [];
  private readonly waiting = new Map<number, { resolve: (r: Res) => void; reject: (e: Error) => void }>();
  private seq = 0;
  private failure: Error | null = null;

  constructor(script: URL, workerData: unknown, size: number) {
    for (let i = 0; i < Math.max(1, size); i++) {
      const worker = new Worker(script, { workerData });
      const slot = { worker, busy: 0 };
      worker.on('message', (res: Res) => {
        slot.busy--;
        const w = this.waiting.get(res.seq);
        this.waiting.delete(res.seq);
        if (!res.error) w?.resolve(res);
        else w?.reject(Object.assign(new Error(res.error.message), res.error.code ? { code: res.error.code } : {}));
      });
      worker.on('error', (err) => this.fail(err));
      this.workers.push(slot);
    }
  }

  /** Sends `req` (the buffers in `transfer` move to the worker) and resolves with its reply. */
  run(req: Req, transfer: ArrayBuffer[] = []): Promise<Res> {
    if (this.failure) return Promise.reject(this.failure);
    const slot = this.leastBusy();
    const seq = this.seq++;
    slot.busy++;
    return new Promise((resolve, reject) => {
      this.waiting.set(seq, { resolve, reject });
      slot.worker.postMessage({ ...req, seq }, transfer);
    });
  }

  /** A message that expects no reply (e.g. a buffer handed back for reuse). */
  post(msg: object, transfer: ArrayBuffer[] = []): void {
    if (this.failure) return;
    this.leastBusy().worker.postMessage(msg, transfer);
  }

  private leastBusy(): { worker: Worker; busy: number } {
    return this.workers.reduce((a, b) => (b.busy < a.busy ? b : a));
  }

  private fail(err: Error): void {
    this.failure ??= err;
    for (const w of this.waiting.values()) w.reject(err);
    this.waiting.clear();
  }

  /** Stops the threads; requests still in flight are failed. */
  async close(): Promise<void> {
    this.fail(new Error('worker pool closed'));
    await Promise.all(this.workers.map((w) => w.worker.terminate()));
  }
}

/** `bytes` as an ArrayBuffer of exactly its length, ready to transfer (copied only when it is a view). */
export function exactBuffer(bytes: Uint8Array): ArrayBuffer {
  // new Uint8Array(view) copies; Buffer#slice would not (it is subarray).
  const exact = bytes.byteOffset === 0 && bytes.byteLength === bytes.buffer.byteLength && bytes.buffer instanceof ArrayBuffer ? bytes : new Uint8Array(bytes);
  return exact.buffer as ArrayBuffer;
}
