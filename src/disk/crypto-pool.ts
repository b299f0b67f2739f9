import { Worker } from 'node:worker_threads';
import { openBlob, sealChunk } from '../core/blob.js';
import type { ChunkId } from '../core/chunk-id.js';
import { BlobError } from '../core/errors.js';
import type { LineageKeys } from '../core/keys.js';
import type { CryptoReply, CryptoRequest } from './crypto-worker.js';

/**
 * Opens and seals chunk blobs on worker threads, so reads of a running desktop use more than one
 * core. Workers start on first use and never keep the process alive; size 0 runs in-thread.
 */
export class CryptoPool {
  private workers: { worker: Worker; busy: number }[] = [];
  private readonly waiting = new Map<number, { resolve: (r: CryptoReply) => void; reject: (e: Error) => void }>();
  private seq = 0;

  constructor(
    private readonly keys: LineageKeys,
    private readonly size: number,
  ) {}

  /**
   * With `handOver`, the blob's memory may move to the worker (the caller must not reuse it).
   * `checkId: false` for blobs already verified when they entered the vault (see openBlob).
   */
  async open(id: ChunkId, blob: Buffer, handOver = false, checkId = true): Promise<Buffer> {
    if (this.size === 0) return openBlob(this.keys, id, blob, { checkId });
    const owned = handOver && blob.byteOffset === 0 && blob.byteLength === blob.buffer.byteLength;
    const r = await this.call({ seq: 0, op: 'open', id, blob: owned ? (blob.buffer as ArrayBuffer) : copyOut(blob), checkId });
    return Buffer.from(r.data);
  }

  async seal(plain: Buffer): Promise<{ id: ChunkId; blob: Buffer }> {
    if (this.size === 0) return sealChunk(this.keys, plain);
    const r = await this.call({ seq: 0, op: 'seal', plain: copyOut(plain) });
    return { id: r.id, blob: Buffer.from(r.data) };
  }

  private call(req: CryptoRequest): Promise<Extract<CryptoReply, { ok: true }>> {
    if (this.workers.length === 0) this.start();
    const slot = this.workers.reduce((a, b) => (b.busy < a.busy ? b : a));
    const seq = ++this.seq;
    const msg = { ...req, seq };
    slot.busy++;
    if (slot.busy === 1) slot.worker.ref();
    return new Promise((resolve, reject) => {
      this.waiting.set(seq, {
        resolve: (r) => {
          if (--slot.busy === 0) slot.worker.unref();
          if (r.ok) resolve(r);
          else reject(r.blobReason ? new BlobError(r.id ?? '', r.blobReason, r.message) : new Error(r.message));
        },
        reject: (e) => {
          slot.busy--;
          reject(e);
        },
      });
      slot.worker.postMessage(msg, [msg.op === 'open' ? msg.blob : msg.plain]);
    });
  }

  private start(): void {
    for (let i = 0; i < this.size; i++) {
      const worker = new Worker(new URL('./crypto-worker.js', import.meta.url), {
        workerData: { dataKey: this.keys.dataKey, idKey: this.keys.idKey },
      });
      worker.unref();
      worker.on('message', (r: CryptoReply) => {
        const w = this.waiting.get(r.seq);
        this.waiting.delete(r.seq);
        w?.resolve(r);
      });
      worker.on('error', (err) => this.failAll(err));
      this.workers.push({ worker, busy: 0 });
    }
  }

  private failAll(err: Error): void {
    for (const w of this.waiting.values()) w.reject(err);
    this.waiting.clear();
    const old = this.workers;
    this.workers = [];
    for (const w of old) void w.worker.terminate();
  }

  async close(): Promise<void> {
    const old = this.workers;
    this.workers = [];
    await Promise.all(old.map((w) => w.worker.terminate()));
  }
}

/** A transferable copy (the caller's buffer may be shared with a cache or a pool slab). */
function copyOut(b: Buffer): ArrayBuffer {
  const ab = new ArrayBuffer(b.length);
  b.copy(Buffer.from(ab));
  return ab;
}
