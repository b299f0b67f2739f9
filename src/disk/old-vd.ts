import { mkdir, open, readFile, rename } from 'node:fs/promises';
import { join } from 'node:path';
import { openBlob, sealChunk } from '../core/blob.js';
import type { ChunkId } from '../core/chunk-id.js';
import { chunkLength, isZero } from '../core/chunking.js';
import { CarryonError } from '../core/errors.js';
import type { LineageKeys } from '../core/keys.js';
import { decodeManifest, encodeManifest, manifestDigest, type Manifest } from '../core/manifest.js';
import type { ChunkStore } from '../store/chunk-store.js';
import type { BlockDevice } from './block-device.js';

export interface VaultDiskOptions {
  stateDir: string;
  store: ChunkStore;
  keys: LineageKeys;
  base: Manifest;
  /** Brings a chunk that is not local yet into `store` (boot while data is in flight). */
  fetchChunk?: (id: ChunkId, index: number) => Promise<void>;
  cacheBytes?: number;
  autoFlushMs?: number;
  /** Seal early when this many bytes of writes are buffered. */
  maxDirtyBytes?: number;
}

export class DiskIoError extends CarryonError {
  constructor(message: string) {
    super('disk-io', message);
  }
}

/** Small LRU of decrypted chunks (reads of the same chunk are common: NBD requests are small). */
class PlainCache {
  private readonly map = new Map<number, Buffer>();
  private bytes = 0;
  constructor(private readonly limit: number) {}
  get(i: number): Buffer | undefined {
    const b = this.map.get(i);
    if (b) {
      this.map.delete(i);
      this.map.set(i, b);
    }
    return b;
  }
  set(i: number, b: Buffer): void {
    this.delete(i);
    this.map.set(i, b);
    this.bytes += b.length;
    for (const [k, v] of this.map) {
      if (this.bytes <= this.limit) break;
      this.map.delete(k);
      this.bytes -= v.length;
    }
  }
  delete(i: number): void {
    const b = this.map.get(i);
    if (b) {
      this.map.delete(i);
      this.bytes -= b.length;
    }
  }
}

/**
 * Copy-on-write disk over the vault: reads decrypt chunk blobs, writes collect in memory and are
 * sealed into new blobs at flush. The current manifest and the dirty set (chunks that differ from
 * the base) are persisted atomically after the blobs are durable, so a crash loses at most
 * writes not yet flushed, and check-in never rescans the disk.
 */
export class VaultDisk implements BlockDevice {
  readonly readOnly = false;
  readonly size: number;
  private readonly dirtyBuffers = new Map<number, Buffer>();
  private dirtyBufferBytes = 0;
  private cache: PlainCache;
  private timer: NodeJS.Timeout | null = null;
  /** One operation at a time: NBD clients may use several connections (multi-conn). */
  private queue: Promise<unknown> = Promise.resolve();
  private closed = false;

  private constructor(private readonly opts: VaultDiskOptions, private base: Manifest, private current: Manifest) {
    this.size = current.diskSize;
    this.cache = new PlainCache(opts.cacheBytes ?? 64 * 1024 * 1024);
    if ((opts.autoFlushMs ?? 5000) > 0) {
      this.timer = setInterval(() => void this.flush().catch(() => undefined), opts.autoFlushMs ?? 5000);
      this.timer.unref();
    }
  }

  static async open(opts: VaultDiskOptions): Promise<VaultDisk> {
    await mkdir(opts.stateDir, { recursive: true, mode: 0o700 });
    const baseDigest = manifestDigest(opts.base);
    let current = opts.base;
    try {
      const saved = JSON.parse(await readFile(join(opts.stateDir, 'disk-state.json'), 'utf8')) as { baseDigest: string; current: string };
      if (saved.baseDigest !== baseDigest) {
        throw new CarryonError('state-mismatch', `disk state in ${opts.stateDir} belongs to another base snapshot`);
      }
      current = decodeManifest(Buffer.from(saved.current, 'base64'));
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err;
    }
    return new VaultDisk(opts, opts.base, { ...current, chunks: [...current.chunks] });
  }

  currentManifest(): Manifest {
    return { ...this.current, chunks: [...this.current.chunks] };
  }

  baseManifest(): Manifest {
    return this.base;
  }

  /** Chunk indexes whose flushed content differs from the base. */
  dirtyIndexes(): number[] {
    const out: number[] = [];
    for (let i = 0; i < this.current.chunks.length; i++) if (this.current.chunks[i] !== (this.base.chunks[i] ?? null)) out.push(i);
    return out;
  }

  dirtyBytes(): number {
    return this.dirtyIndexes().reduce((sum, i) => sum + chunkLength(i, this.size, this.current.chunkSize), 0) + this.dirtyBufferBytes;
  }

  async missingChunks(): Promise<ChunkId[]> {
    const ids = [...new Set(this.current.chunks.filter((c): c is ChunkId => c !== null))];
    return this.opts.store.missing(ids);
  }

  async percentLocal(): Promise<number> {
    const ids = new Set(this.current.chunks.filter((c): c is ChunkId => c !== null));
    if (ids.size === 0) return 100;
    const missing = await this.opts.store.missing([...ids]);
    return (100 * (ids.size - missing.length)) / ids.size;
  }

  private checkRange(offset: number, length: number): void {
    if (this.closed) throw new DiskIoError('disk is closed');
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0 || offset + length > this.size) {
      throw new DiskIoError(`range ${offset}+${length} is outside the disk (${this.size} bytes)`);
    }
  }

  /** Plaintext of chunk i (its current content), or null for a hole. */
  private async chunk(i: number): Promise<Buffer | null> {
    const dirty = this.dirtyBuffers.get(i);
    if (dirty) return dirty;
    const id = this.current.chunks[i];
    if (id === null || id === undefined) return null;
    const cached = this.cache.get(i);
    if (cached) return cached;
    let blob = await this.opts.store.get(id);
    if (!blob && this.opts.fetchChunk) {
      await this.opts.fetchChunk(id, i);
      blob = await this.opts.store.get(id);
    }
    if (!blob) throw new DiskIoError(`chunk ${i} (${id}) is not in the vault yet and cannot be fetched`);
    const plain = openBlob(this.opts.keys, id, blob);
    this.cache.set(i, plain);
    return plain;
  }

  private serial<T>(fn: () => Promise<T>): Promise<T> {
    const run = this.queue.then(fn, fn);
    this.queue = run.catch(() => undefined);
    return run;
  }

  /**
   * Reads run concurrently with each other and with writes (NBD orders nothing between requests
   * in flight); each chunk is read whole from a dirty buffer or a sealed blob, never half-updated.
   */
  read(offset: number, length: number): Promise<Buffer> {
    return this.readNow(offset, length);
  }

  private async readNow(offset: number, length: number): Promise<Buffer> {
    this.checkRange(offset, length);
    const out = Buffer.alloc(length);
    const cs = this.current.chunkSize;
    for (let pos = offset; pos < offset + length; ) {
      const i = Math.floor(pos / cs);
      const within = pos - i * cs;
      const n = Math.min(cs - within, offset + length - pos);
      const plain = await this.chunk(i);
      if (plain) plain.copy(out, pos - offset, within, within + n);
      pos += n;
    }
    return out;
  }

  private async mutate(offset: number, length: number, fill: (dst: Buffer, dstOff: number, srcOff: number, n: number) => void): Promise<void> {
    const cs = this.current.chunkSize;
    for (let pos = offset; pos < offset + length; ) {
      const i = Math.floor(pos / cs);
      const within = pos - i * cs;
      const n = Math.min(cs - within, offset + length - pos);
      let buf = this.dirtyBuffers.get(i);
      if (!buf) {
        const len = chunkLength(i, this.size, cs);
        buf = Buffer.alloc(len);
        if (n < len) (await this.chunk(i))?.copy(buf);
        this.dirtyBuffers.set(i, buf);
        this.dirtyBufferBytes += len;
        this.cache.delete(i);
      }
      fill(buf, within, pos - offset, n);
      pos += n;
    }
  }

  write(offset: number, data: Buffer, fua = false): Promise<void> {
    return this.serial(async () => {
      this.checkRange(offset, data.length);
      await this.mutate(offset, data.length, (dst, dstOff, srcOff, n) => data.copy(dst, dstOff, srcOff, srcOff + n));
      if (fua || this.dirtyBufferBytes > (this.opts.maxDirtyBytes ?? 64 * 1024 * 1024)) await this.flushNow();
    });
  }

  writeZeroes(offset: number, length: number, fua = false): Promise<void> {
    return this.serial(async () => {
      this.checkRange(offset, length);
      await this.mutate(offset, length, (dst, dstOff, _s, n) => dst.fill(0, dstOff, dstOff + n));
      if (fua) await this.flushNow();
    });
  }

  /** Discarded ranges read back as zeros (whole chunks become holes at flush). */
  trim(offset: number, length: number): Promise<void> {
    return this.writeZeroes(offset, length);
  }

  /** Seals buffered writes, makes blobs durable, then records manifest + dirty set atomically. */
  flush(): Promise<void> {
    return this.serial(() => this.flushNow());
  }

  private async flushNow(): Promise<void> {
    if (this.dirtyBuffers.size === 0) return;
    const batch = [...this.dirtyBuffers];
    for (const [i, buf] of batch) {
      if (isZero(buf)) {
        this.current.chunks[i] = null;
        continue;
      }
      const sealed = sealChunk(this.opts.keys, buf);
      await this.opts.store.put(sealed.id, sealed.blob, { defer: true });
      this.current.chunks[i] = sealed.id;
      this.cache.set(i, Buffer.from(buf));
    }
    await this.opts.store.sync();
    await this.persist();
    this.dirtyBuffers.clear();
    this.dirtyBufferBytes = 0;
  }

  private async persist(): Promise<void> {
    const path = join(this.opts.stateDir, 'disk-state.json');
    const tmp = `${path}.tmp`;
    const fh = await open(tmp, 'w', 0o600);
    await fh.writeFile(JSON.stringify({ baseDigest: manifestDigest(this.base), current: encodeManifest(this.current).toString('base64'), dirty: this.dirtyIndexes() }));
    await fh.sync();
    await fh.close();
    await rename(tmp, path);
  }

  /** After check-in or replication: the current content becomes the new base. */
  async rebase(newBase: Manifest): Promise<void> {
    await this.flush();
    await this.queue;
    if (manifestDigest(newBase) !== manifestDigest(this.current)) throw new CarryonError('state-mismatch', 'new base differs from the disk content');
    this.base = newBase;
    await this.persist();
  }

  /** Rollback: forget every change since the base. */
  async discard(): Promise<void> {
    await this.queue;
    this.dirtyBuffers.clear();
    this.dirtyBufferBytes = 0;
    this.current = { ...this.base, chunks: [...this.base.chunks] };
    this.cache = new PlainCache(this.opts.cacheBytes ?? 64 * 1024 * 1024);
    await this.persist();
  }

  async close(): Promise<void> {
    if (this.closed) return;
    if (this.timer) clearInterval(this.timer);
    await this.flush();
    this.closed = true;
  }
}
