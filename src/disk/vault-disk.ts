import type { ChunkId } from '../core/chunk-id.js';
import { chunkLength, isZero, MiB } from '../core/chunking.js';
import type { LineageKeys } from '../core/keys.js';
import { createManifest, manifestDigest, type Manifest } from '../core/manifest.js';
import type { ChunkStore } from '../store/chunk-store.js';
import { availableParallelism } from 'node:os';
import { mapLimit } from '../store/fs-chunk-store.js';
import { CryptoPool } from './crypto-pool.js';
import { checkRange, chunkSpans, DiskError, type BlockDevice } from './block-device.js';
import { loadDiskState, saveDiskState } from './disk-state.js';
import { KeyedMutex } from './keyed-mutex.js';
import { ByteLru } from './lru.js';

export interface VaultDiskOptions {
  stateDir: string;
  store: ChunkStore;
  keys: LineageKeys;
  base: Manifest;
  /** Fetches a chunk that is not local yet (fast start); resolves once the blob is in `store`. */
  fetchChunk?: (id: ChunkId, index: number) => Promise<void>;
  /** Plaintext LRU cache bound (default 64 MiB). */
  cacheBytes?: number;
  /** Seal and persist unflushed writes at least this often (default 5000; 0 disables). */
  autoFlushMs?: number;
  /** Unsealed write buffers above this are sealed early (default 64 MiB). */
  maxDirtyBytes?: number;
  readOnly?: boolean;
  /** Worker threads that decrypt and seal blobs (default: cores − 1 up to 4 on ≥ 4 cores, else 0 = in-thread). */
  cryptoWorkers?: number;
  /**
   * Re-check every chunk's HMAC on each read (default false): blobs are verified in full when
   * they enter the vault, and GCM (AAD = header ‖ ID) proves they are unchanged since.
   */
  verifyIdsOnRead?: boolean;
  /** Chunks read ahead once reads turn sequential (default 8; 0 disables). */
  readAheadChunks?: number;
}

/**
 * Copy-on-write disk over a chunk store. Reads decrypt chunk blobs into a bounded cache; writes
 * modify plaintext chunk buffers in memory, sealed into new blobs on flush/FUA/timer/pressure.
 * The current manifest and the set of chunks changed vs the base persist in `stateDir`, written
 * only after the blobs they reference are durable, so a crash never loses flushed data.
 */
export class VaultDisk implements BlockDevice {
  readonly size: number;
  readonly readOnly: boolean;
  private base: Manifest;
  private baseDigest: string;
  private readonly current: (ChunkId | null)[];
  private readonly changed: Set<number>;
  private readonly buffers = new Map<number, Buffer>();
  private bufferedBytes = 0;
  private stateDirty = false;
  private readonly locks = new KeyedMutex<number>();
  private readonly cache: ByteLru<ChunkId>;
  private readonly loading = new Map<ChunkId, Promise<Buffer>>();
  private flushChain: Promise<void> = Promise.resolve();
  private timer: NodeJS.Timeout | undefined;
  private readonly crypto: CryptoPool;
  private closed = false;
  /** Chunk index just past the previous read: a read starting there is sequential. */
  private nextSequential = -1;
  /** Last failure of a background (timer or pressure) flush; cleared by a successful flush. */
  lastFlushError: Error | undefined;

  private constructor(
    private readonly opts: VaultDiskOptions,
    current: (ChunkId | null)[],
    changed: number[],
  ) {
    this.base = opts.base;
    this.baseDigest = manifestDigest(opts.base);
    this.size = opts.base.diskSize;
    this.readOnly = opts.readOnly ?? false;
    this.current = current;
    this.changed = new Set(changed);
    this.cache = new ByteLru(opts.cacheBytes ?? 64 * MiB);
    const cores = availableParallelism();
    // With 2 cores or fewer, QEMU and the NBD client need the other core: decrypt in-thread.
    this.crypto = new CryptoPool(opts.keys, opts.cryptoWorkers ?? (cores >= 4 ? Math.min(4, cores - 1) : 0));
    const every = opts.autoFlushMs ?? 5000;
    if (every > 0 && !this.readOnly) {
      this.timer = setInterval(() => {
        if (this.buffers.size > 0 || this.stateDirty) this.backgroundFlush();
      }, every);
      this.timer.unref();
    }
  }

  static async open(opts: VaultDiskOptions): Promise<VaultDisk> {
    const base = createManifest(opts.base.chunkSize, opts.base.diskSize, opts.base.chunks.slice());
    const digest = manifestDigest(base);
    const saved = await loadDiskState(opts.stateDir);
    if (saved) {
      if (saved.baseDigest !== digest) {
        throw new DiskError(
          'state',
          `disk state in ${opts.stateDir} belongs to base ${saved.baseDigest.slice(0, 12)}…, not ${digest.slice(0, 12)}…`,
        );
      }
      if (saved.current.chunkSize !== base.chunkSize || saved.current.diskSize !== base.diskSize) {
        throw new DiskError('state', `disk state in ${opts.stateDir} has a different disk geometry than its base`);
      }
      return new VaultDisk({ ...opts, base }, saved.current.chunks, saved.changed);
    }
    const disk = new VaultDisk({ ...opts, base }, base.chunks.slice(), []);
    // A read-only open records nothing: there is nothing to remember until something is written.
    if (!disk.readOnly) await saveDiskState(opts.stateDir, disk.snapshotState());
    return disk;
  }

  get chunkSize(): number {
    return this.base.chunkSize;
  }

  /** The manifest as of the last seal (call flush() first to include buffered writes). */
  currentManifest(): Manifest {
    return { chunkSize: this.base.chunkSize, diskSize: this.base.diskSize, chunks: this.current.slice() };
  }

  baseManifest(): Manifest {
    return { ...this.base, chunks: this.base.chunks.slice() };
  }

  /** Chunk indexes that differ from the base (sealed or still buffered), ascending. */
  dirtyIndexes(): number[] {
    const all = new Set([...this.changed, ...this.buffers.keys()]);
    return [...all].sort((a, b) => a - b);
  }

  /** Plaintext bytes of the chunks that differ from the base (an upper bound of what check-in sends). */
  dirtyBytes(): number {
    return this.dirtyIndexes().reduce((sum, i) => sum + this.lengthOf(i), 0);
  }

  /** Bytes written but not yet sealed into the store. */
  unflushedBytes(): number {
    return this.bufferedBytes;
  }

  async missingChunks(): Promise<ChunkId[]> {
    return this.opts.store.missing(this.referenced());
  }

  /** Percentage (0–100) of the distinct chunks this disk references that are in the store. */
  async percentLocal(): Promise<number> {
    const ids = this.referenced();
    if (ids.length === 0) return 100;
    const missing = await this.opts.store.missing(ids);
    return ((ids.length - missing.length) / ids.length) * 100;
  }

  async read(offset: number, length: number): Promise<Buffer> {
    this.ensureOpen();
    checkRange(this.size, offset, length);
    const spans = chunkSpans(this.base.chunkSize, offset, length);
    this.readAhead(spans[0]!.index, spans[spans.length - 1]!.index);
    if (spans.length === 1) {
      // Within one chunk: hand out a view of the (immutable) sealed plaintext, no copy.
      const { index, inChunk, len } = spans[0]!;
      return this.locks.run(index, async () => {
        const buffered = this.buffers.get(index);
        if (buffered) return Buffer.from(buffered.subarray(inChunk, inChunk + len));
        return (await this.plaintext(index)).subarray(inChunk, inChunk + len);
      });
    }
    const out = Buffer.allocUnsafe(length);
    await Promise.all(
      spans.map(({ index, inChunk, outOff, len }) =>
        this.locks.run(index, async () => {
          const src = this.buffers.get(index) ?? (await this.plaintext(index));
          src.copy(out, outOff, inChunk, inChunk + len);
        }),
      ),
    );
    return out;
  }

  async write(offset: number, data: Buffer, fua = false): Promise<void> {
    this.ensureWritable();
    checkRange(this.size, offset, data.length);
    await Promise.all(
      chunkSpans(this.base.chunkSize, offset, data.length).map(({ index, inChunk, outOff, len }) =>
        this.locks.run(index, async () => {
          const buf = await this.bufferFor(index, inChunk === 0 && len === this.lengthOf(index));
          data.copy(buf, inChunk, outOff, outOff + len);
        }),
      ),
    );
    await this.afterWrite(fua);
  }

  async writeZeroes(offset: number, length: number, fua = false): Promise<void> {
    this.ensureWritable();
    checkRange(this.size, offset, length);
    await Promise.all(
      chunkSpans(this.base.chunkSize, offset, length).map(({ index, inChunk, len }) =>
        this.locks.run(index, async () => {
          if (inChunk === 0 && len === this.lengthOf(index)) {
            this.makeHole(index);
          } else if (this.buffers.has(index) || this.current[index] !== null) {
            (await this.bufferFor(index, false)).fill(0, inChunk, inChunk + len);
          }
        }),
      ),
    );
    await this.afterWrite(fua);
  }

  async trim(offset: number, length: number): Promise<void> {
    await this.writeZeroes(offset, length, false);
  }

  /** Seals buffered writes, makes the blobs durable, then persists manifest + dirty set atomically. */
  async flush(): Promise<void> {
    this.ensureOpen();
    await this.serialized(() => this.flushNow());
  }

  /** After check-in/replicate: `newBase` becomes the base; the dirty set is what still differs from it. */
  async rebase(newBase: Manifest): Promise<void> {
    this.ensureOpen();
    if (newBase.chunkSize !== this.base.chunkSize || newBase.diskSize !== this.base.diskSize) {
      throw new DiskError('state', 'rebase to a manifest with a different disk geometry');
    }
    const base = createManifest(newBase.chunkSize, newBase.diskSize, newBase.chunks.slice());
    await this.serialized(async () => {
      await this.flushNow();
      this.base = base;
      this.baseDigest = manifestDigest(base);
      this.changed.clear();
      this.current.forEach((id, i) => {
        if (id !== base.chunks[i]) this.changed.add(i);
      });
      await saveDiskState(this.opts.stateDir, this.snapshotState());
    });
  }

  /** Rollback: forget every change since the base (buffered and sealed). */
  async discard(): Promise<void> {
    this.ensureOpen();
    await this.serialized(async () => {
      this.buffers.clear();
      this.bufferedBytes = 0;
      this.base.chunks.forEach((id, i) => (this.current[i] = id));
      this.changed.clear();
      this.stateDirty = false;
      await saveDiskState(this.opts.stateDir, this.snapshotState());
    });
  }

  async close(): Promise<void> {
    if (this.closed) return;
    if (this.timer) clearInterval(this.timer);
    if (!this.readOnly) await this.serialized(() => this.flushNow());
    this.closed = true;
    this.cache.clear();
    await this.crypto.close();
  }

  // ---- internals ----

  private async flushNow(): Promise<void> {
    await mapLimit([...this.buffers.keys()], 8, (index) => this.locks.run(index, () => this.seal(index)));
    // Snapshot before sync: every blob it references was put before the sync below.
    const snapshot = this.snapshotState();
    const wasDirty = this.stateDirty;
    this.stateDirty = false;
    try {
      await this.opts.store.sync();
      if (wasDirty) await saveDiskState(this.opts.stateDir, snapshot);
      this.lastFlushError = undefined;
    } catch (err) {
      this.stateDirty = true;
      throw err;
    }
  }

  private async seal(index: number): Promise<void> {
    const buf = this.buffers.get(index);
    if (!buf) return;
    let id: ChunkId | null = null;
    if (!isZero(buf)) {
      const sealed = await this.crypto.seal(buf);
      await this.opts.store.put(sealed.id, sealed.blob, { defer: true });
      id = sealed.id;
      this.cache.set(id, buf);
    }
    this.buffers.delete(index);
    this.bufferedBytes -= buf.length;
    this.setChunk(index, id);
  }

  private makeHole(index: number): void {
    const buf = this.buffers.get(index);
    if (buf) {
      this.buffers.delete(index);
      this.bufferedBytes -= buf.length;
    }
    if (this.current[index] !== null) this.setChunk(index, null);
  }

  private setChunk(index: number, id: ChunkId | null): void {
    this.current[index] = id;
    if (id === this.base.chunks[index]) this.changed.delete(index);
    else this.changed.add(index);
    this.stateDirty = true;
  }

  /** The writable buffer of a chunk (must hold its lock); `whole` skips loading old content. */
  private async bufferFor(index: number, whole: boolean): Promise<Buffer> {
    let buf = this.buffers.get(index);
    if (buf) return buf;
    buf = whole ? Buffer.alloc(this.lengthOf(index)) : Buffer.from(await this.plaintext(index));
    this.buffers.set(index, buf);
    this.bufferedBytes += buf.length;
    return buf;
  }

  private async afterWrite(fua: boolean): Promise<void> {
    if (fua) return this.flush();
    if (this.bufferedBytes > (this.opts.maxDirtyBytes ?? 64 * MiB)) await this.serialized(() => this.flushNow());
  }

  /** Sealed plaintext of chunk `index` (shared with the cache: never mutate). */
  private async plaintext(index: number): Promise<Buffer> {
    const id = this.current[index] ?? null;
    if (id === null) return Buffer.alloc(this.lengthOf(index));
    const hit = this.cache.get(id);
    if (hit) return hit;
    let pending = this.loading.get(id);
    if (!pending) {
      pending = this.load(id, index).finally(() => this.loading.delete(id));
      this.loading.set(id, pending);
    }
    return pending;
  }

  /**
   * Sequential reads (a guest booting, nbdcopy, a backup) warm the next chunks in the cache, so
   * store reads and decryption overlap the client's next requests instead of following them.
   */
  private readAhead(first: number, last: number): void {
    const window = this.opts.readAheadChunks ?? 8;
    const sequential = first === this.nextSequential || first === this.nextSequential - 1;
    this.nextSequential = last + 1;
    if (!sequential || window === 0) return;
    const end = Math.min(this.current.length, last + 1 + window);
    for (let i = last + 1; i < end; i++) {
      const id = this.current[i];
      if (id == null || this.buffers.has(i) || this.loading.has(id) || this.cache.has(id)) continue;
      // Failures surface on the real read of that chunk, not here.
      this.plaintext(i).catch(() => undefined);
    }
  }

  private async load(id: ChunkId, index: number): Promise<Buffer> {
    let blob = await this.opts.store.get(id);
    if (!blob) {
      if (!this.opts.fetchChunk) throw new DiskError('io', `chunk ${index} (${id.slice(0, 12)}…) is not in the vault`);
      try {
        await this.opts.fetchChunk(id, index);
      } catch (err) {
        throw new DiskError('io', `chunk ${index} could not be fetched: ${(err as Error).message}`);
      }
      blob = await this.opts.store.get(id);
      if (!blob) throw new DiskError('io', `chunk ${index} (${id.slice(0, 12)}…) is still missing after fetch`);
    }
    const plain = await this.crypto.open(id, blob, true, this.opts.verifyIdsOnRead ?? false);
    if (plain.length !== this.lengthOf(index)) {
      throw new DiskError('io', `chunk ${index} decrypts to ${plain.length} bytes, expected ${this.lengthOf(index)}`);
    }
    this.cache.set(id, plain);
    return plain;
  }

  private lengthOf(index: number): number {
    return chunkLength(index, this.base.diskSize, this.base.chunkSize);
  }

  private referenced(): ChunkId[] {
    return [...new Set(this.current.filter((id): id is ChunkId => id !== null))];
  }

  private snapshotState(): { baseDigest: string; current: Manifest; changed: number[] } {
    return {
      baseDigest: this.baseDigest,
      current: this.currentManifest(),
      changed: [...this.changed].sort((a, b) => a - b),
    };
  }

  private serialized(fn: () => Promise<void>): Promise<void> {
    const run = this.flushChain.then(fn);
    this.flushChain = run.catch(() => undefined);
    return run;
  }

  private backgroundFlush(): void {
    this.serialized(() => this.flushNow()).catch((err: Error) => (this.lastFlushError = err));
  }

  private ensureOpen(): void {
    if (this.closed) throw new DiskError('closed', 'disk is closed');
  }

  private ensureWritable(): void {
    this.ensureOpen();
    if (this.readOnly) throw new DiskError('read-only', 'disk is read-only');
  }
}
