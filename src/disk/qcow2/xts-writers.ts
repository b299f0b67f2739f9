import { closeSync, constants, openSync } from 'node:fs';
import { availableParallelism } from 'node:os';
import { exactBuffer, WorkerPool } from '../../core/worker-pool.js';
import type { XtsWriteBody, XtsWriteResult, XtsWriterInit } from './xts-write-worker.js';

/**
 * Threads that encrypt clusters and write them to an image file (its descriptors are shared: the
 * process's own). Whole clusters go with O_DIRECT where the file system allows it: a check-out
 * writes each cluster once and never reads it back, so copying it into the page cache only costs
 * CPU (on a VM whose free pages go back to the host, most of a check-out's kernel time: 4 GiB
 * check-out here 10.5 s → 7.4 s, 6 → 1.3 s of system time). Durability is unchanged: the base
 * writer's fdatasync covers the inode whichever descriptor wrote it. The main thread of a
 * check-out already carries TLS, GCM and zstd; moving the XTS and the writes off it lets the
 * transfer use a second core.
 *
 * Plaintext reaches the threads through slots, each a SharedArrayBuffer: a chunk's plaintext is
 * opened straight into a slot (`spare`), the request carries the slot (shared, not copied), and
 * the slot is free again when the thread answers. Slots are made as writes in flight need them,
 * not all at start: a fresh page costs a fault on first touch (≈ 11 µs each on this project's
 * VMs, where freed pages go back to the host), and 16 MiB of slots zeroed at open cost ≈ 45 ms
 * while a second check-out, a few chunks in flight, used a handful. Before slots, each chunk's
 * buffer was transferred there and back (detached, re-attached and accounted on each isolate): the per-byte path took ≈ 24 %
 * more CPU (bench/profile-datapath.ts). A buffer that is no slot of ours (a copy for a second
 * disk) is copied into a free slot, or, when every slot is busy, transferred as before.
 */
export class XtsWriters {
  private readonly pool: WorkerPool<XtsWriteBody, XtsWriteResult>;
  private readonly directFd: number | null;
  /** Slots made so far (at most `maxSlots`); free ones, the one freed last at the end. */
  private made = 0;
  private readonly maxSlots: number;
  private readonly free: SharedArrayBuffer[] = [];
  /** Slots handed out by `spare` and not yet written or given back. */
  private readonly lent = new Set<SharedArrayBuffer>();

  /**
   * `key`: the 64-byte XTS volume key; `fd`: the image, open for writing, closed only after
   * `close`; `path`: the same image, opened again for direct I/O (null: page cache only);
   * `clusterSize`: what each write covers (a shorter buffer is padded with zeros), and the slots' size;
   * `subcluster`: an image with extended L2, whose subclusters of zeros `write` leaves unwritten (null: none).
   */
  constructor(key: Buffer, fd: number, path: string | null, private readonly clusterSize: number, private readonly subcluster: number | null = null, size = Math.min(4, Math.max(1, availableParallelism() - 1))) {
    this.directFd = path === null ? null : openDirect(path);
    this.maxSlots = Math.max(MIN_SLOTS, Math.min(MAX_SLOTS, Math.floor(SLOT_BYTES / clusterSize)));
    const init: XtsWriterInit = { key: new Uint8Array(key), fd, directFd: this.directFd };
    this.pool = new WorkerPool(new URL('./xts-write-worker.js', import.meta.url), init, size);
  }

  /**
   * Encrypts and writes `plain` (at most a cluster; the rest of the cluster is written as zeros)
   * at byte `host`. The caller must not use `plain` afterwards: a slot is reused for the next
   * chunk, any other buffer may move to the worker. With subclusters: resolves with those written
   * (bit k: subcluster k), the others hold only zeros and were skipped; without, null (all written).
   */
  async write(plain: Buffer, host: number): Promise<number | null> {
    const subcluster = this.subcluster ?? undefined;
    if (plain.length > this.clusterSize) throw new RangeError(`${plain.length} bytes do not fit a ${this.clusterSize}-byte cluster`);
    let slot = this.lentSlotOf(plain);
    if (slot === null) {
      slot = this.take();
      if (slot !== null) plain.copy(this.view(slot));
    }
    if (slot === null) {
      let whole = plain;
      if (whole.length !== this.clusterSize) {
        whole = Buffer.alloc(this.clusterSize);
        plain.copy(whole);
      }
      const data = exactBuffer(whole);
      return (await this.pool.run({ data, host, subcluster }, [data])).written ?? null;
    }
    this.lent.delete(slot);
    if (plain.length !== this.clusterSize) this.view(slot).fill(0, plain.length);
    try {
      return (await this.pool.run({ slot, length: this.clusterSize, host, subcluster })).written ?? null;
    } finally {
      // Answered (or failed): the thread no longer reads the slot.
      this.free.push(slot);
    }
  }

  /**
   * Encrypts and writes pieces of one cluster (each at most the cluster, in whole sectors,
   * disjoint) at byte `host` + each piece's offset: a delta's pages over a cluster that holds the
   * rest already. The pieces are copied; the caller keeps them.
   */
  async writePieces(pieces: readonly { offset: number; bytes: Uint8Array }[], host: number): Promise<void> {
    for (const p of pieces) {
      if (p.offset < 0 || p.offset + p.bytes.length > this.clusterSize) throw new RangeError(`piece ${p.offset}+${p.bytes.length} is outside a ${this.clusterSize}-byte cluster`);
    }
    const slot = this.take();
    if (slot === null) {
      // Every slot busy (rare: writes of whole chunks hold them): one piece at a time, each moved to the thread.
      for (const p of pieces) {
        const data = exactBuffer(Buffer.from(p.bytes));
        await this.pool.run({ data, host: host + p.offset }, [data]);
      }
      return;
    }
    try {
      const view = this.view(slot);
      for (const p of pieces) view.set(p.bytes, p.offset);
      await this.pool.run({ slot, pieces: pieces.map((p) => ({ offset: p.offset, length: p.bytes.length })), host });
    } finally {
      this.free.push(slot);
    }
  }

  /**
   * A free slot (a cluster-sized view; old contents: overwrite it whole) to open the next chunk's
   * plaintext into, or null when every slot is busy. Pass it to `write`, or back to `giveBack`.
   */
  spare(): Buffer | null {
    const slot = this.take();
    if (slot === null) return null;
    this.lent.add(slot);
    return this.view(slot);
  }

  /** A buffer from `spare` that will not be written after all (its chunk failed authentication). */
  giveBack(buf: Buffer): void {
    const slot = this.lentSlotOf(buf);
    if (slot === null) return;
    this.lent.delete(slot);
    this.free.push(slot);
  }

  /** Stops the threads; writes still in flight are failed. */
  async close(): Promise<void> {
    await this.pool.close();
    if (this.directFd !== null) closeSync(this.directFd);
  }

  /** A free slot: the one freed last (its pages are touched already), else a new one while fewer than `maxSlots` exist. */
  private take(): SharedArrayBuffer | null {
    const slot = this.free.pop();
    if (slot !== undefined) return slot;
    if (this.made >= this.maxSlots) return null;
    this.made++;
    return new SharedArrayBuffer(this.clusterSize);
  }

  private view(slot: SharedArrayBuffer): Buffer {
    return Buffer.from(slot);
  }

  /** The slot `buf` is a view of (from its start: `spare`'s buffer or a prefix of it), if `spare` lent it out. */
  private lentSlotOf(buf: Buffer): SharedArrayBuffer | null {
    const slot = buf.buffer;
    return buf.byteOffset === 0 && slot instanceof SharedArrayBuffer && this.lent.has(slot) ? slot : null;
  }
}

/** Shared slot memory: about this much (enough for every stream's writes in flight and one chunk being opened per stream)... */
const SLOT_BYTES = 16 * 1024 * 1024;
/** ...but at least and at most this many slots, whatever the cluster size. */
const MIN_SLOTS = 8;
const MAX_SLOTS = 64;

function openDirect(path: string): number | null {
  try {
    return openSync(path, constants.O_WRONLY | constants.O_DIRECT);
  } catch (err) {
    // Some file systems refuse O_DIRECT (EINVAL: tmpfs before Linux 6.6, some FUSE): page cache then.
    if ((err as NodeJS.ErrnoException).code === 'EINVAL') return null;
    throw err;
  }
}
