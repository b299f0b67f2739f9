import { randomBytes } from 'node:crypto';
import { mkdir, open, readdir, rm, type FileHandle } from 'node:fs/promises';
import { join } from 'node:path';
import { chunkIdFromBytes, chunkIdToBytes, parseChunkId, type ChunkId } from '../core/chunk-id.js';
import { CarryonError } from '../core/errors.js';
import type { ChunkStore } from './chunk-store.js';
import { ManifestFiles } from './manifest-files.js';
import { migrate, openSqlite, type Db } from './sqlite.js';

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
 * Record: id 32 ‖ length u32be ‖ blob, so a pack can be re-indexed by a scan if ever needed.
 */
const RECORD_HEAD = 36;
const PACK_LIMIT = 1024 ** 3;

interface Location {
  pack: string;
  offset: number;
  length: number;
}

export class PackChunkStore implements ChunkStore {
  private readonly pending = new Map<ChunkId, Location & { written: Promise<void> }>();
  private readonly syncing = new Map<ChunkId, Location & { written: Promise<void> }>();
  private writer: { name: string; fh: FileHandle; size: number } | null = null;
  private opening: Promise<void> | null = null;
  private readonly readers = new Map<string, Promise<FileHandle>>();
  private readonly manifests: ManifestFiles;
  private readonly q: {
    get: (id: Buffer) => { pack: string; offset: number; length: number } | undefined;
    insert: (id: Buffer, pack: string, offset: number, length: number) => unknown;
    delete: (id: Buffer) => unknown;
  };

  private constructor(
    readonly root: string,
    private readonly db: Db,
  ) {
    this.manifests = new ManifestFiles(join(root, 'manifests'), join(root, 'tmp'));
    const get = db.prepare('SELECT pack, offset, length FROM blobs WHERE id = ?');
    const insert = db.prepare('INSERT OR IGNORE INTO blobs (id, pack, offset, length) VALUES (?, ?, ?, ?)');
    const del = db.prepare('DELETE FROM blobs WHERE id = ?');
    this.q = {
      get: (id) => get.get(id) as Location | undefined,
      insert: (id, pack, offset, length) => insert.run(id, pack, offset, length),
      delete: (id) => del.run(id),
    };
  }

  static async open(root: string): Promise<PackChunkStore> {
    await mkdir(join(root, 'packs'), { recursive: true });
    await mkdir(join(root, 'manifests'), { recursive: true });
    await rm(join(root, 'tmp'), { recursive: true, force: true });
    await mkdir(join(root, 'tmp'), { recursive: true });
    const db = openSqlite(join(root, 'index.sqlite'));
    // The index commit is what publishes blobs: it must survive power loss, not just a crash.
    db.pragma('synchronous = FULL');
    migrate(db, 'pack-store', [
      { version: 1, sql: 'CREATE TABLE blobs (id BLOB PRIMARY KEY, pack TEXT NOT NULL, offset INTEGER NOT NULL, length INTEGER NOT NULL) WITHOUT ROWID' },
    ]);
    return new PackChunkStore(root, db);
  }

  async has(id: ChunkId): Promise<boolean> {
    parseChunkId(id);
    return this.pending.has(id) || this.syncing.has(id) || this.q.get(chunkIdToBytes(id)) !== undefined;
  }

  async get(id: ChunkId): Promise<Buffer | null> {
    parseChunkId(id);
    const unsynced = this.pending.get(id) ?? this.syncing.get(id);
    if (unsynced) await unsynced.written;
    const loc = unsynced ?? this.q.get(chunkIdToBytes(id));
    if (!loc) return null;
    const fh = await this.reader(loc.pack);
    const buf = Buffer.allocUnsafe(RECORD_HEAD + loc.length);
    const { bytesRead } = await fh.read(buf, 0, buf.length, loc.offset);
    if (bytesRead !== buf.length || buf.readUInt32BE(32) !== loc.length || chunkIdFromBytes(buf.subarray(0, 32)) !== id) {
      throw new CarryonError('store-corrupt', `pack ${loc.pack} does not hold chunk ${id} at ${loc.offset} as its index says`);
    }
    return buf.subarray(RECORD_HEAD);
  }

  async put(id: ChunkId, blob: Uint8Array, opts: { defer?: boolean } = {}): Promise<boolean> {
    if (await this.has(id)) return false;
    const record = Buffer.allocUnsafe(RECORD_HEAD + blob.length);
    chunkIdToBytes(id).copy(record, 0);
    record.writeUInt32BE(blob.length, 32);
    Buffer.from(blob.buffer, blob.byteOffset, blob.byteLength).copy(record, RECORD_HEAD);
    const w = await this.currentWriter(record.length);
    // Space is reserved before the write, so concurrent puts append side by side.
    const offset = w.size;
    w.size += record.length;
    const written = w.fh.write(record, 0, record.length, offset).then(() => undefined);
    this.pending.set(id, { pack: w.name, offset, length: blob.length, written });
    try {
      await written;
    } catch (err) {
      this.pending.delete(id);
      throw err;
    }
    if (!opts.defer) await this.sync();
    return true;
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
      for (const pack of new Set(good.map(([, loc]) => loc.pack))) await (await this.reader(pack, true)).datasync();
      this.db.transaction(() => {
        for (const [id, loc] of good) this.q.insert(chunkIdToBytes(id), loc.pack, loc.offset, loc.length);
      })();
    } catch (err) {
      // Not published: put back what was written whole, so a later sync retries it.
      for (const [id, loc] of good) if (!this.q.get(chunkIdToBytes(id))) this.pending.set(id, loc);
      throw err;
    } finally {
      for (const [id] of batch) this.syncing.delete(id);
    }
  }

  async delete(id: ChunkId): Promise<void> {
    parseChunkId(id);
    this.pending.delete(id);
    // The bytes stay in the pack until compaction (not built yet); the index no longer names them.
    this.q.delete(chunkIdToBytes(id));
  }

  async *list(): AsyncIterable<ChunkId> {
    for (const row of this.db.prepare('SELECT id FROM blobs ORDER BY id').iterate()) yield chunkIdFromBytes((row as { id: Buffer }).id);
    for (const id of this.pending.keys()) yield id;
  }

  async missing(ids: readonly ChunkId[]): Promise<ChunkId[]> {
    const out: ChunkId[] = [];
    for (const id of new Set(ids)) if (!(await this.has(id))) out.push(id);
    return out;
  }

  putManifest(digest: string, encoded: Uint8Array): Promise<void> {
    return this.manifests.put(digest, encoded);
  }

  getManifest(digest: string): Promise<Buffer | null> {
    return this.manifests.get(digest);
  }

  async stats(): Promise<{ chunks: number; bytes: number }> {
    const r = this.db.prepare('SELECT COUNT(*) AS chunks, COALESCE(SUM(length), 0) AS bytes FROM blobs').get() as { chunks: number; bytes: number };
    let { chunks, bytes } = r;
    for (const loc of this.pending.values()) {
      chunks++;
      bytes += loc.length;
    }
    return { chunks, bytes };
  }

  /** Pack files and the bytes in them that no index row names (crash leftovers, deleted blobs). */
  async packUsage(): Promise<{ packs: number; packBytes: number; liveBytes: number }> {
    const names = (await readdir(join(this.root, 'packs'))).filter((n) => n.endsWith('.pack'));
    let packBytes = 0;
    for (const n of names) packBytes += (await (await this.reader(n)).stat()).size;
    const live = this.db.prepare('SELECT COALESCE(SUM(length + ?), 0) AS b FROM blobs').get(RECORD_HEAD) as { b: number };
    return { packs: names.length, packBytes, liveBytes: live.b };
  }

  /** Publishes what is pending, then releases files and the index even when that fails. */
  async close(): Promise<void> {
    try {
      await this.sync();
    } finally {
      const handles = await Promise.all([...this.readers.values()].map((p) => p.catch(() => null)));
      this.readers.clear();
      await Promise.all(handles.map((h) => h?.close()));
      this.writer = null;
      this.db.close();
    }
  }

  /** This process's pack, created on first write; a new one past PACK_LIMIT. */
  private async currentWriter(need: number): Promise<{ name: string; fh: FileHandle; size: number }> {
    while (!this.writer || this.writer.size + need > PACK_LIMIT) {
      if (this.writer && this.writer.size + need > PACK_LIMIT) this.writer = null;
      this.opening ??= (async () => {
        const name = `${Date.now().toString(36)}-${process.pid}-${randomBytes(4).toString('hex')}.pack`;
        const fh = await open(join(this.root, 'packs', name), 'wx+', 0o600);
        const dir = await open(join(this.root, 'packs'), 'r');
        await dir.sync().finally(() => dir.close());
        this.readers.set(name, Promise.resolve(fh));
        this.writer = { name, fh, size: 0 };
      })().finally(() => (this.opening = null));
      await this.opening;
    }
    return this.writer;
  }

  /**
   * One open handle per pack, kept for the store's life (packs are few: one per writing session,
   * 1 GiB each; compaction, not built yet, would merge small ones).
   */
  private reader(name: string, mustExist = false): Promise<FileHandle> {
    let p = this.readers.get(name);
    if (!p) {
      if (mustExist) throw new CarryonError('store-corrupt', `pack ${name} is not open`);
      if (!/^[0-9a-z]+-\d+-[0-9a-f]{8}\.pack$/.test(name)) throw new CarryonError('store-corrupt', `index names an invalid pack ${name}`);
      p = open(join(this.root, 'packs', name), 'r');
      this.readers.set(name, p);
      p.catch(() => this.readers.delete(name));
    }
    return p;
  }
}
