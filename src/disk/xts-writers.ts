import { closeSync, constants, openSync } from 'node:fs';
import { availableParallelism } from 'node:os';
import { Worker } from 'node:worker_threads';
import type { XtsWriteRequest, XtsWriteResult, XtsWriterInit } from './xts-write-worker.js';

/**
 * Threads that encrypt clusters and write them to an image file (its descriptors are shared: the
 * process's own). Whole clusters go with O_DIRECT where the file system allows it: a check-out
 * writes each cluster once and never reads it back, so copying it into the page cache only costs
 * CPU (on a VM whose free pages go back to the host, most of a check-out's kernel time: 4 GiB
 * check-out here 10.5 s → 7.4 s, 6 → 1.3 s of system time). Durability is unchanged: the base
 * writer's fdatasync covers the inode whichever descriptor wrote it. The main thread of a
 * check-out already carries TLS, GCM and zstd; moving the XTS and the writes off it lets the
 * transfer use a second core.
 */
export class XtsWriters {
  private readonly workers: { worker: Worker; busy: number }[] = [];
  private readonly waiting = new Map<number, { resolve: () => void; reject: (e: Error) => void }>();
  private seq = 0;
  private failure: Error | null = null;
  private readonly directFd: number | null;

  /**
   * `key`: the 64-byte XTS volume key; `fd`: the image, open for writing, closed only after
   * `close`; `path`: the same image, opened again for direct I/O (null: page cache only).
   */
  constructor(key: Buffer, fd: number, path: string | null, size = Math.min(4, Math.max(1, availableParallelism() - 1))) {
    this.directFd = path === null ? null : openDirect(path);
    for (let i = 0; i < size; i++) {
      const init: XtsWriterInit = { key: new Uint8Array(key), fd, directFd: this.directFd };
      const worker = new Worker(new URL('./xts-write-worker.js', import.meta.url), { workerData: init });
      const slot = { worker, busy: 0 };
      worker.on('message', (res: XtsWriteResult) => {
        slot.busy--;
        const w = this.waiting.get(res.seq);
        this.waiting.delete(res.seq);
        if (!res.error) w?.resolve();
        else w?.reject(Object.assign(new Error(res.error.message), res.error.code ? { code: res.error.code } : {}));
      });
      worker.on('error', (err) => this.fail(err));
      this.workers.push(slot);
    }
  }

  /** Encrypts and writes `cluster` (a whole cluster; its buffer moves to the worker) at byte `host`. */
  write(cluster: Buffer, host: number): Promise<void> {
    if (this.failure) return Promise.reject(this.failure);
    let exact: Uint8Array = cluster;
    if (cluster.byteOffset !== 0 || cluster.byteLength !== cluster.buffer.byteLength) {
      exact = new Uint8Array(cluster.length);
      exact.set(cluster);
    }
    const data = exact.buffer as ArrayBuffer;
    const slot = this.workers.reduce((a, b) => (b.busy < a.busy ? b : a));
    const seq = this.seq++;
    slot.busy++;
    return new Promise((resolve, reject) => {
      this.waiting.set(seq, { resolve, reject });
      slot.worker.postMessage({ seq, data, host } satisfies XtsWriteRequest, [data]);
    });
  }

  private fail(err: Error): void {
    this.failure = err;
    for (const w of this.waiting.values()) w.reject(err);
    this.waiting.clear();
  }

  /** Stops the threads; writes still in flight are failed. */
  async close(): Promise<void> {
    this.fail(new Error('image writer closed'));
    await Promise.all(this.workers.map((w) => w.worker.terminate()));
    if (this.directFd !== null) closeSync(this.directFd);
  }
}

function openDirect(path: string): number | null {
  try {
    return openSync(path, constants.O_WRONLY | constants.O_DIRECT);
  } catch (err) {
    // Some file systems refuse O_DIRECT (EINVAL: tmpfs before Linux 6.6, some FUSE): page cache then.
    if ((err as NodeJS.ErrnoException).code === 'EINVAL') return null;
    throw err;
  }
}
