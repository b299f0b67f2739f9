import { randomBytes } from 'node:crypto';
import { mkdir, open, readdir, rm, stat, unlink, type FileHandle } from 'node:fs/promises';
import { availableParallelism } from 'node:os';
import { join } from 'node:path';
import { chunkIdFromBytes, chunkIdToBytes, parseChunkId, type ChunkId } from '../core/chunk-id.js';
import { CarryonError } from '../core/errors.js';
import type { CollectableStore, PackInfo } from './chunk-store.js';
import { ManifestFiles } from './manifest-files.js';
import { type BlobUse, packCreatedAt, packWriterPid, RECORD_HEAD, SqlitePackIndex, type Location } from './pack-index.js';

/**
 * Pack store: blobs appended to large pack files, located through an SQLite index.
 *
 * One file per blob costs a file creation, a rename and an fsync per 256 KiB; on an ordinary
 * ext4 laptop disk that, not crypto, bounded check-out and import. Here a group commit is: append
 * the blobs (page cache), fdatasync the pack, then one index transaction. A blob is visible to
 * other readers only once its index row is committed, and that happens only after its bytes are
 * durable, so a crash leaves at most unindexed bytes at a pack's tail (wasted, never wrong).
 *
 * Several processes may use one store (the laptop's `checkout` filling the vault while `serve`
 * writes new blobs): each process appends only to packs it created; the index is shared (WAL).
 * A process never appends to a pack older than `packMaxAgeMs`, so garbage collection may compact
 * or delete any pack older than twice that (and this process's own sealed packs at once).
 * Record: id 32 ‖ length u32be ‖ blob, so a pack can be re-indexed by a scan if ever needed.
 */
const PACK_LIMIT = 1024 ** 3;

export interface PackStoreOptions {
  /** Packs appended to side by side (more than one when many import workers write). */
  writers?: number;
  /** A `missing`/duplicate `put` re-marks a blob as used at most this often (GC grace must exceed it). */
  touchSlackMs?: number;
  /** No pack takes appends for longer than this. */
  packMaxAgeMs?: number;
}

/** One pack writer per four cores (1 on a laptop), at most 4: fdatasyncs of a group commit run side by side. */
export function defaultPackWriters(): number {
  return Math.max(1, Math.min(4, Math.floor(availableParallelism() / 4)));
}

interface Writer {
  name: string;
  fh: FileHandle;
  size: number;
  createdAt: number;
}

type Pending = Location & { written: Promise<void> };

export class PackChunkStore implements CollectableStore {
  private readonly pending = new Map<ChunkId, Pending>();
  private readonly syncing = new Map<ChunkId, Pending>();
  private readonly writers: (Writer | null)[];
  private readonly opening: (Promise<void> | null)[];
  private nextWriter = 0;
  private readonly readers = new Map<string, Promise<FileHandle>>();
  private readonly manifestFiles: ManifestFiles;
  readonly touchSlackMs: number;
  private readonly packMaxAgeMs: number;

  private constructor(
    readonly root: string,
    private readonly index: SqlitePackIndex,
    opts: PackStoreOptions,
  ) {
    this.manifestFiles = new ManifestFiles(join(root, 'manifests'), join(root, 'tmp'));
    const n = Math.max(1, Math.min(16, opts.writers ?? defaultPackWriters()));
    this.writers = new Array<Writer | null>(n).fill(null);
    this.opening = new Array<Promise<void> | null>(n).fill(null);
    this.touchSlackMs = opts.touchSlackMs ?? 10 * 60_000;
    this.packMaxAgeMs = opts.packMaxAgeMs ?? 3600_000;
  }

  static async open(root: string, opts: PackStoreOptions = {}): Promise<PackChunkStore> {
    await mkdir(join(root, 'packs'), { recursive: true });
    await mkdir(join(root, 'manifests'), { recursive: true });
    await rm(join(root, 'tmp'), { recursive: true, force: true });
    await mkdir(join(root, 'tmp'), { recursive: true });
    return new PackChunkStore(root, SqlitePackIndex.open(join(root, 'index.sqlite')), opts);
  }

  async has(id: ChunkId): Promise<boolean> {
    parseChunkId(id);
    return this.pending.has(id) || this.syncing.has(id) || this.index.getSync(id) !== null;
  }

  async get(id: ChunkId): Promise<Buffer | null> {
    parseChunkId(id);
    for (let attempt = 0; ; attempt++) {
      const unsynced = this.pending.get(id) ?? this.syncing.get(id);
      if (unsynced) await unsynced.written;
      const loc = unsynced ?? this.index.getSync(id);
      if (!loc) return null;
      try {
        return await this.readRecord(id, loc);
      } catch (err) {
        // Compaction moved the blob and deleted its old pack between the lookup and the read.
        const code = (err as NodeJS.ErrnoException).code;
        if ((code === 'ENOENT' || code === 'EBADF') && attempt === 0) continue;
        throw err;
      }
    }
  }

  private async readRecord(id: ChunkId, loc: Location): Promise<Buffer> {
    const fh = await this.reader(loc.pack);
    const buf = Buffer.allocUnsafe(RECORD_HEAD + loc.length);
    const { bytesRead } = await fh.read(buf, 0, buf.length, loc.offset);
    if (bytesRead !== buf.length || buf.readUInt32BE(32) !== loc.length || chunkIdFromBytes(buf.subarray(0, 32)) !== id) {
      throw new CarryonError('store-corrupt', `pack ${loc.pack} does not hold chunk ${id} at ${loc.offset} as its index says`);
    }
    return buf.subarray(RECORD_HEAD);
  }

  async put(id: ChunkId, blob: Uint8Array, opts: { defer?: boolean } = {}): Promise<boolean> {
    if (await this.has(id)) {
      this.touch([id]);
      return false;
    }
    const record = Buffer.allocUnsafe(RECORD_HEAD + blob.length);
    chunkIdToBytes(id).copy(record, 0);
    record.writeUInt32BE(blob.length, 32);
    Buffer.from(blob.buffer, blob.byteOffset, blob.byteLength).copy(record, RECORD_HEAD);
    const loc = await this.append(record);
    this.pending.set(id, { ...loc, length: blob.length });
    try {
      await loc.written;
    } catch (err) {
      this.pending.delete(id);
      throw err;
    }
    if (!opts.defer) await this.sync();
    return true;
  }

  /** Appends a whole record to one of this process's packs; space is reserved before the write. */
  private async append(record: Buffer): Promise<{ pack: string; offset: number; written: Promise<void> }> {
    const w = await this.currentWriter(record.length);
    const offset = w.size;
    w.size += record.length;
    const written = w.fh.write(record, 0, record.length, offset).then(() => undefined);
    return { pack: w.name, offset, written };
  }

  async sync(): Promise<void> {
    const batch = [...this.pending];
    if (batch.length === 0) return;
    for (const [id, loc] of batch) {
      this.pending.delete(id);
      this.syncing.set(id, loc);
    }
    // A blob whose write failed was never stored: its put rejected and said so; it is dropped here.
    const settled = await Promise.allSettled(batch.map(([, loc]) => loc.written));
    const good = batch.filter((_, i) => settled[i]!.status === 'fulfilled');
    try {
      await this.datasync(good.map(([, loc]) => loc.pack));
      this.index.insertSync(good.map(([id, loc]) => ({ id, pack: loc.pack, offset: loc.offset, length: loc.length })), Date.now());
    } catch (err) {
      // Not published: put back what was written whole, so a later sync retries it.
      for (const [id, loc] of good) if (!this.index.getSync(id)) this.pending.set(id, loc);
      throw err;
    } finally {
      for (const [id] of batch) this.syncing.delete(id);
    }
  }

  private async datasync(packs: string[]): Promise<void> {
    await Promise.all([...new Set(packs)].map(async (pack) => (await this.reader(pack, true)).datasync()));
  }

  async delete(id: ChunkId): Promise<void> {
    parseChunkId(id);
    this.pending.delete(id);
    // The bytes stay in the pack until compaction; the index no longer names them.
    await this.index.delete(id);
  }

  async *list(): AsyncIterable<ChunkId> {
    for await (const row of this.index.list()) yield row.id;
    for (const id of this.pending.keys()) yield id;
  }

  async missing(ids: readonly ChunkId[]): Promise<ChunkId[]> {
    const out: ChunkId[] = [];
    const present: ChunkId[] = [];
    for (const id of new Set(ids)) (await this.has(id) ? present : out).push(id);
    this.touch(present);
    return out;
  }

  private touch(ids: readonly ChunkId[]): void {
    const now = Date.now();
    this.index.touchSync(ids, now, now - this.touchSlackMs);
  }

  putManifest(digest: string, encoded: Uint8Array): Promise<void> {
    return this.manifestFiles.put(digest, encoded);
  }

  getManifest(digest: string): Promise<Buffer | null> {
    return this.manifestFiles.get(digest);
  }

  manifests(): AsyncIterable<{ digest: string; modifiedAt: number }> {
    return this.manifestFiles.list();
  }

  deleteManifest(digest: string): Promise<void> {
    return this.manifestFiles.delete(digest);
  }

  async stats(): Promise<{ chunks: number; bytes: number }> {
    let { chunks, bytes } = await this.index.stats();
    for (const loc of this.pending.values()) {
      chunks++;
      bytes += loc.length;
    }
    return { chunks, bytes };
  }

  /** Pack files and the bytes in them that no index row names (crash leftovers, deleted blobs). */
  async packUsage(): Promise<{ packs: number; packBytes: number; liveBytes: number }> {
    const packs = await this.packs();
    return { packs: packs.length, packBytes: packs.reduce((s, p) => s + p.bytes, 0), liveBytes: packs.reduce((s, p) => s + p.liveBytes, 0) };
  }

  // Garbage collection (see src/broker/gc/)

  usage(): AsyncIterable<BlobUse> {
    return this.index.list();
  }

  sweep(ids: readonly ChunkId[], cutoff: number): Promise<{ blobs: number; bytes: number }> {
    return this.index.sweep(ids, cutoff);
  }

  async sealPacks(): Promise<void> {
    await Promise.all(this.opening.filter(Boolean));
    this.writers.fill(null);
  }

  async packs(): Promise<PackInfo[]> {
    const live = new Map((await this.index.packs()).map((p) => [p.name, p.liveBytes]));
    // This process's current packs, and packs holding blobs it has written but not published.
    const own = new Set([...this.writers.filter((w): w is Writer => w !== null).map((w) => w.name), ...[...this.pending.values(), ...this.syncing.values()].map((l) => l.pack)]);
    const out: PackInfo[] = [];
    for (const name of (await readdir(join(this.root, 'packs'))).filter((n) => n.endsWith('.pack')).sort()) {
      const st = await stat(join(this.root, 'packs', name)).catch(() => null);
      if (!st) continue;
      const createdAt = packCreatedAt(name);
      // Another process may still append to a pack younger than twice the maximum age; a pack
      // named with our pid was written by us (or by a dead process): only our writers append to it.
      const mine = packWriterPid(name) === process.pid;
      const active = own.has(name) || createdAt === null || (!mine && Date.now() - createdAt < 2 * this.packMaxAgeMs);
      out.push({ name, createdAt, bytes: st.size, liveBytes: live.get(name) ?? 0, active });
    }
    return out;
  }

  /** Whether this process may write `name` right now (a current pack, or unpublished blobs in it). */
  private busy(name: string): boolean {
    if (this.writers.some((w) => w?.name === name)) return true;
    for (const l of this.pending.values()) if (l.pack === name) return true;
    for (const l of this.syncing.values()) if (l.pack === name) return true;
    return false;
  }

  async compactPack(info: PackInfo): Promise<{ moved: number; freedBytes: number }> {
    const name = info.name;
    if (info.active || this.busy(name)) return { moved: 0, freedBytes: 0 };
    const rows = await this.index.inPack(name);
    const moves: { id: ChunkId; from: Location; to: Location }[] = [];
    const writes: Promise<void>[] = [];
    for (const row of rows) {
      const blob = await this.readRecord(row.id, row);
      const record = Buffer.allocUnsafe(RECORD_HEAD + row.length);
      chunkIdToBytes(row.id).copy(record, 0);
      record.writeUInt32BE(row.length, 32);
      blob.copy(record, RECORD_HEAD);
      const to = await this.append(record);
      writes.push(to.written);
      moves.push({ id: row.id, from: row, to: { pack: to.pack, offset: to.offset, length: row.length } });
    }
    await Promise.all(writes);
    await this.datasync(moves.map((m) => m.to.pack));
    this.index.relocateSync(moves);
    return { moved: moves.length, freedBytes: await this.dropPack(info) };
  }

  async dropPack(info: PackInfo): Promise<number> {
    const name = info.name;
    if (info.active || this.busy(name) || (await this.index.inPack(name)).length > 0) return 0;
    const handle = this.readers.get(name);
    this.readers.delete(name);
    await (await handle?.catch(() => null))?.close();
    await unlink(join(this.root, 'packs', name));
    return info.bytes;
  }

  /** Publishes what is pending, then releases files and the index even when that fails. */
  async close(): Promise<void> {
    try {
      await this.sync();
    } finally {
      const handles = await Promise.all([...this.readers.values()].map((p) => p.catch(() => null)));
      this.readers.clear();
      await Promise.all(handles.map((h) => h?.close()));
      this.writers.fill(null);
      await this.index.close();
    }
  }

  /** One of this process's packs (round robin), created on first write; a new one past the size or age limit. */
  private async currentWriter(need: number): Promise<Writer> {
    const slot = this.nextWriter++ % this.writers.length;
    for (;;) {
      const w = this.writers[slot];
      if (w && w.size + need <= PACK_LIMIT && Date.now() - w.createdAt < this.packMaxAgeMs) return w;
      if (w === this.writers[slot]) this.writers[slot] = null;
      this.opening[slot] ??= (async () => {
        const createdAt = Date.now();
        const name = `${createdAt.toString(36)}-${process.pid}-${randomBytes(4).toString('hex')}.pack`;
        const fh = await open(join(this.root, 'packs', name), 'wx+', 0o600);
        const dir = await open(join(this.root, 'packs'), 'r');
        await dir.sync().finally(() => dir.close());
        this.readers.set(name, Promise.resolve(fh));
        this.writers[slot] = { name, fh, size: 0, createdAt };
      })().finally(() => (this.opening[slot] = null));
      await this.opening[slot];
    }
  }

  /**
   * One open handle per pack, kept for the store's life (packs are few: one per writing session,
   * 1 GiB each at most).
   */
  private reader(name: string, mustExist = false): Promise<FileHandle> {
    let p = this.readers.get(name);
    if (!p) {
      if (mustExist) throw new CarryonError('store-corrupt', `pack ${name} is not open`);
      if (packCreatedAt(name) === null) throw new CarryonError('store-corrupt', `index names an invalid pack ${name}`);
      p = open(join(this.root, 'packs', name), 'r');
      this.readers.set(name, p);
      p.catch(() => this.readers.delete(name));
    }
    return p;
  }
}

