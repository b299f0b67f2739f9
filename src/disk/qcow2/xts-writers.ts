import { closeSync, constants, openSync } from 'node:fs';
import { availableParallelism } from 'node:os';
import { exactBuffer, WorkerPool } from '../../core/worker-pool.js';
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
  private readonly pool: WorkerPool<Omit<XtsWriteRequest, 'seq'>, XtsWriteResult>;
  private readonly directFd: number | null;
  private readonly spares: ArrayBuffer[] = [];

  /**
   * `key`: the 64-byte XTS volume key; `fd`: the image, open for writing, closed only after
   * `close`; `path`: the same image, opened again for direct I/O (null: page cache only).
   */
  constructor(key: Buffer, fd: number, path: string | null, size = Math.min(4, Math.max(1, availableParallelism() - 1))) {
    this.directFd = path === null ? null : openDirect(path);
    const init: XtsWriterInit = { key: new Uint8Array(key), fd, directFd: this.directFd };
    this.pool = new WorkerPool(new URL('./xts-write-worker.js', import.meta.url), init, size);
  }

  /** Encrypts and writes `cluster` (a whole cluster; its buffer moves to the worker) at byte `host`. */
  async write(cluster: Buffer, host: number): Promise<void> {
    const data = exactBuffer(cluster);
    const { data: back } = await this.pool.run({ data, host }, [data]);
    if (this.spares.length < MAX_SPARES) this.spares.push(back);
  }

  /**
   * A buffer a finished write handed back (its old contents: overwrite it whole), or null. Filling
   * it instead of a new buffer saves an mmap and its page faults per chunk (glibc maps every
   * allocation of 128 KiB or more on its own).
   */
  spare(): Buffer | null {
    const b = this.spares.pop();
    return b ? Buffer.from(b) : null;
  }

  /** Stops the threads; writes still in flight are failed. */
  async close(): Promise<void> {
    await this.pool.close();
    if (this.directFd !== null) closeSync(this.directFd);
  }
}

/** Spare buffers kept: a few per stream's writes in flight (more would only hold memory). */
const MAX_SPARES = 16;

function openDirect(path: string): number | null {
  try {
    return openSync(path, constants.O_WRONLY | constants.O_DIRECT);
  } catch (err) {
    // Some file systems refuse O_DIRECT (EINVAL: tmpfs before Linux 6.6, some FUSE): page cache then.
    if ((err as NodeJS.ErrnoException).code === 'EINVAL') return null;
    throw err;
  }
}
