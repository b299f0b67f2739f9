import { chunkIdFromBytes, chunkIdToBytes, type ChunkId } from '../core/chunk-id.js';
import { CarryonError } from '../core/errors.js';
import { migrate, openSqlite, type Db, type Migration } from '../sql/sqlite.js';

/** Record layout inside a pack: id 32 ‖ length u32be ‖ blob (a pack can be re-indexed by a scan). */
export const RECORD_HEAD = 36;

export interface Location {
  pack: string;
  offset: number;
  length: number;
}

/** A blob as a record to append to a pack. */
export function encodeRecord(id: ChunkId, blob: Uint8Array): Buffer {
  const record = Buffer.allocUnsafe(RECORD_HEAD + blob.length);
  chunkIdToBytes(id).copy(record, 0);
  record.writeUInt32BE(blob.length, 32);
  Buffer.from(blob.buffer, blob.byteOffset, blob.byteLength).copy(record, RECORD_HEAD);
  return record;
}

/** The blob in `record`, after checking that it is the one the index (or the writer) placed there. */
export function checkRecord(record: Buffer | null, id: ChunkId, loc: Location): Buffer {
  if (!record) throw new CarryonError('store-corrupt', `pack ${loc.pack}, which holds chunk ${id}, is missing`);
  if (record.length !== RECORD_HEAD + loc.length || record.readUInt32BE(32) !== loc.length || chunkIdFromBytes(record.subarray(0, 32)) !== id) {
    throw new CarryonError('store-corrupt', `pack ${loc.pack} does not hold chunk ${id} at ${loc.offset} as its index says`);
  }
  return record.subarray(RECORD_HEAD);
}

/**
 * The pack index schema, shared by the local pack store and the S3 store. `touched` is the last
 * time (ms) the blob was stored, deduplicated against or reported present: garbage collection
 * never sweeps a blob touched after its cutoff (the grace period), like Proxmox Backup Server's
 * chunk atime.
 */
export const PACK_INDEX_MIGRATIONS: Migration[] = [
  { version: 1, sql: 'CREATE TABLE blobs (id BLOB PRIMARY KEY, pack TEXT NOT NULL, offset INTEGER NOT NULL, length INTEGER NOT NULL) WITHOUT ROWID' },
  { version: 2, sql: 'ALTER TABLE blobs ADD COLUMN touched INTEGER NOT NULL DEFAULT 0; CREATE INDEX blobs_pack ON blobs(pack)' },
];

/** One indexed blob: its pack, its size and its last-use mark (ms). */
export interface BlobUse {
  id: ChunkId;
  pack: string;
  length: number;
  touched: number;
}

/** Pack files or objects with what the index says lives in them. */
export interface PackUse {
  name: string;
  liveBytes: number;
  blobs: number;
}

/**
 * Where packed blobs are, asynchronous so that a database server can hold it (the S3 store's
 * index must be shared by every broker and transfer server that writes the bucket).
 * Implementation here: SQLite (WAL, synchronous = FULL: a commit is what publishes blobs).
 */
export interface PackIndex {
  get(id: ChunkId): Promise<Location | null>;
  /** Publishes new blobs (first writer wins) in one transaction; returns how many were new. */
  insert(rows: readonly (Location & { id: ChunkId })[], touched: number): Promise<number>;
  /** Moves blobs that are still at `from` (compaction); others are left alone. */
  relocate(rows: readonly { id: ChunkId; from: Location; to: Location }[]): Promise<void>;
  delete(id: ChunkId): Promise<void>;
  /** Marks `ids` used now where their mark is older than `before` (one write per slack period). */
  touch(ids: readonly ChunkId[], now: number, before: number): Promise<void>;
  /** The subset of `ids` present, as a set. */
  present(ids: readonly ChunkId[]): Promise<Set<ChunkId>>;
  list(): AsyncIterable<BlobUse>;
  /** Deletes each id whose mark is still older than `cutoff`; what was deleted. */
  sweep(ids: readonly ChunkId[], cutoff: number): Promise<{ blobs: number; bytes: number }>;
  packs(): Promise<PackUse[]>;
  inPack(pack: string): Promise<(Location & { id: ChunkId })[]>;
  stats(): Promise<{ chunks: number; bytes: number }>;
  close(): Promise<void>;
}

type Row = { id: Buffer; pack: string; offset: number; length: number; touched: number };

/** The SQLite pack index (the pack store's `index.sqlite`; an S3 store's for one process). */
export class SqlitePackIndex implements PackIndex {
  private readonly q;

  constructor(readonly db: Db) {
    this.q = {
      get: db.prepare('SELECT pack, offset, length FROM blobs WHERE id = ?'),
      insert: db.prepare('INSERT OR IGNORE INTO blobs (id, pack, offset, length, touched) VALUES (?, ?, ?, ?, ?)'),
      relocate: db.prepare('UPDATE blobs SET pack = ?, offset = ? WHERE id = ? AND pack = ? AND offset = ?'),
      delete: db.prepare('DELETE FROM blobs WHERE id = ?'),
      touch: db.prepare('UPDATE blobs SET touched = ? WHERE id = ? AND touched < ?'),
      sweep: db.prepare('DELETE FROM blobs WHERE id = ? AND touched < ? RETURNING length'),
      inPack: db.prepare('SELECT id, pack, offset, length FROM blobs WHERE pack = ? ORDER BY offset'),
    };
  }

  static open(path: string): SqlitePackIndex {
    const db = openSqlite(path);
    // The index commit is what publishes blobs: it must survive power loss, not just a crash.
    db.pragma('synchronous = FULL');
    migrate(db, 'pack-store', PACK_INDEX_MIGRATIONS);
    return new SqlitePackIndex(db);
  }

  async get(id: ChunkId): Promise<Location | null> {
    return (this.q.get.get(chunkIdToBytes(id)) as Location | undefined) ?? null;
  }

  async insert(rows: readonly (Location & { id: ChunkId })[], touched: number): Promise<number> {
    let n = 0;
    this.db.transaction(() => {
      for (const r of rows) n += this.q.insert.run(chunkIdToBytes(r.id), r.pack, r.offset, r.length, touched).changes;
    })();
    return n;
  }

  async relocate(rows: readonly { id: ChunkId; from: Location; to: Location }[]): Promise<void> {
    this.db.transaction(() => {
      for (const r of rows) this.q.relocate.run(r.to.pack, r.to.offset, chunkIdToBytes(r.id), r.from.pack, r.from.offset);
    })();
  }

  async delete(id: ChunkId): Promise<void> {
    this.q.delete.run(chunkIdToBytes(id));
  }

  async touch(ids: readonly ChunkId[], now: number, before: number): Promise<void> {
    if (ids.length === 0) return;
    this.db.transaction(() => {
      for (const id of ids) this.q.touch.run(now, chunkIdToBytes(id), before);
    })();
  }

  async present(ids: readonly ChunkId[]): Promise<Set<ChunkId>> {
    const out = new Set<ChunkId>();
    for (const id of ids) if (this.q.get.get(chunkIdToBytes(id))) out.add(id);
    return out;
  }

  async *list(): AsyncIterable<BlobUse> {
    // Read in pages so the iteration never holds a read transaction across the caller's awaits.
    let after: Buffer = Buffer.alloc(0);
    const page = this.db.prepare('SELECT id, pack, length, touched FROM blobs WHERE id > ? ORDER BY id LIMIT 4096');
    for (;;) {
      const rows = page.all(after) as Row[];
      if (rows.length === 0) return;
      for (const r of rows) yield { id: chunkIdFromBytes(r.id), pack: r.pack, length: r.length, touched: r.touched };
      after = rows[rows.length - 1]!.id;
    }
  }

  async sweep(ids: readonly ChunkId[], cutoff: number): Promise<{ blobs: number; bytes: number }> {
    const res = { blobs: 0, bytes: 0 };
    this.db.transaction(() => {
      for (const id of ids) {
        const r = this.q.sweep.get(chunkIdToBytes(id), cutoff) as { length: number } | undefined;
        if (r) {
          res.blobs++;
          res.bytes += r.length;
        }
      }
    })();
    return res;
  }

  async packs(): Promise<PackUse[]> {
    return this.db.prepare('SELECT pack AS name, COUNT(*) AS blobs, SUM(length + ?) AS liveBytes FROM blobs GROUP BY pack ORDER BY pack').all(RECORD_HEAD) as PackUse[];
  }

  async inPack(pack: string): Promise<(Location & { id: ChunkId })[]> {
    return (this.q.inPack.all(pack) as Row[]).map((r) => ({ id: chunkIdFromBytes(r.id), pack: r.pack, offset: r.offset, length: r.length }));
  }

  async stats(): Promise<{ chunks: number; bytes: number }> {
    return this.db.prepare('SELECT COUNT(*) AS chunks, COALESCE(SUM(length), 0) AS bytes FROM blobs').get() as { chunks: number; bytes: number };
  }

  async close(): Promise<void> {
    this.db.close();
  }
}

/** Packs are named `<creation ms, base 36>-<pid>-<random>.pack`; the creation time, or null. */
export function packCreatedAt(name: string): number | null {
  const m = /^([0-9a-z]+)-\d+-[0-9a-f]{8}\.pack$/.exec(name);
  return m ? parseInt(m[1]!, 36) : null;
}

/** The id of the process that wrote a pack (from its name), or null. */
export function packWriterPid(name: string): number | null {
  const m = /^[0-9a-z]+-(\d+)-[0-9a-f]{8}\.pack$/.exec(name);
  return m ? Number(m[1]) : null;
}
