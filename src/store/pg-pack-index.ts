import { chunkIdFromBytes, chunkIdToBytes, type ChunkId } from '../core/chunk-id.js';
import { RECORD_HEAD, type BlobUse, type Location, type PackIndex, type PackUse } from './pack-index.js';
import type { Migration, SqlDb } from '../sql/driver.js';
import { PgSql } from '../sql/pg-driver.js';

/** The pack index's table in PostgreSQL (`offset` is a keyword there: `pack_offset`). */
export const PG_PACK_INDEX_MIGRATIONS: Migration[] = [
  {
    version: 1,
    sql: `CREATE TABLE pack_blobs (id BYTEA PRIMARY KEY, pack TEXT NOT NULL, pack_offset BIGINT NOT NULL, length INTEGER NOT NULL, touched BIGINT NOT NULL DEFAULT 0);
CREATE INDEX pack_blobs_pack ON pack_blobs(pack);`,
  },
];

type Row = { id: Buffer; pack: string; pack_offset: number; length: number; touched: number };
const BATCH = 1000;

function* batches<T>(xs: readonly T[]): Generator<T[]> {
  for (let i = 0; i < xs.length; i += BATCH) yield xs.slice(i, i + BATCH);
}

/**
 * The S3 store's pack index in PostgreSQL: one index for every broker and transfer server that
 * writes the bucket (the broker's own database when it runs on PostgreSQL). Batches go as arrays
 * (`unnest`, `= ANY`), one statement per thousand blobs.
 */
export class PgPackIndex implements PackIndex {
  private constructor(private readonly sql: SqlDb) {}

  static async open(url: string): Promise<PgPackIndex> {
    const sql = await PgSql.open(url, { max: 4 });
    try {
      await sql.migrate('pack-index', PG_PACK_INDEX_MIGRATIONS);
    } catch (err) {
      await sql.close();
      throw err;
    }
    return new PgPackIndex(sql);
  }

  async get(id: ChunkId): Promise<Location | null> {
    const r = await this.sql.get<Row>('SELECT pack, pack_offset, length FROM pack_blobs WHERE id = ?', [chunkIdToBytes(id)]);
    return r ? { pack: r.pack, offset: Number(r.pack_offset), length: Number(r.length) } : null;
  }

  async insert(rows: readonly (Location & { id: ChunkId })[], touched: number): Promise<number> {
    return this.sql.transaction(async (c) => {
      let n = 0;
      for (const b of batches(rows)) {
        n += await c.run(`INSERT INTO pack_blobs (id, pack, pack_offset, length, touched)
          SELECT id, pack, pack_offset, length, ?::bigint FROM unnest(?::bytea[], ?::text[], ?::bigint[], ?::integer[]) AS t(id, pack, pack_offset, length)
          ON CONFLICT (id) DO NOTHING`, [touched, b.map((r) => chunkIdToBytes(r.id)), b.map((r) => r.pack), b.map((r) => r.offset), b.map((r) => r.length)]);
      }
      return n;
    });
  }

  async relocate(rows: readonly { id: ChunkId; from: Location; to: Location }[]): Promise<void> {
    await this.sql.transaction(async (c) => {
      for (const r of rows) {
        await c.run('UPDATE pack_blobs SET pack = ?, pack_offset = ? WHERE id = ? AND pack = ? AND pack_offset = ?', [r.to.pack, r.to.offset, chunkIdToBytes(r.id), r.from.pack, r.from.offset]);
      }
    });
  }

  async delete(id: ChunkId): Promise<void> {
    await this.sql.run('DELETE FROM pack_blobs WHERE id = ?', [chunkIdToBytes(id)]);
  }

  async touch(ids: readonly ChunkId[], now: number, before: number): Promise<void> {
    for (const b of batches(ids)) await this.sql.run('UPDATE pack_blobs SET touched = ? WHERE id = ANY(?::bytea[]) AND touched < ?', [now, b.map(chunkIdToBytes), before]);
  }

  async present(ids: readonly ChunkId[]): Promise<Set<ChunkId>> {
    const out = new Set<ChunkId>();
    for (const b of batches(ids)) {
      for (const r of await this.sql.all<{ id: Buffer }>('SELECT id FROM pack_blobs WHERE id = ANY(?::bytea[])', [b.map(chunkIdToBytes)])) out.add(chunkIdFromBytes(r.id));
    }
    return out;
  }

  async *list(): AsyncIterable<BlobUse> {
    let after: Buffer = Buffer.alloc(0);
    for (;;) {
      const rows = await this.sql.all<Row>('SELECT id, pack, length, touched FROM pack_blobs WHERE id > ? ORDER BY id LIMIT 4096', [after]);
      if (rows.length === 0) return;
      for (const r of rows) yield { id: chunkIdFromBytes(r.id), pack: r.pack, length: Number(r.length), touched: Number(r.touched) };
      after = rows[rows.length - 1]!.id;
    }
  }

  async sweep(ids: readonly ChunkId[], cutoff: number): Promise<{ blobs: number; bytes: number }> {
    return this.sql.transaction(async (c) => {
      const res = { blobs: 0, bytes: 0 };
      for (const b of batches(ids)) {
        for (const r of await c.all<{ length: number }>('DELETE FROM pack_blobs WHERE id = ANY(?::bytea[]) AND touched < ? RETURNING length', [b.map(chunkIdToBytes), cutoff])) {
          res.blobs++;
          res.bytes += Number(r.length);
        }
      }
      return res;
    });
  }

  async packs(): Promise<PackUse[]> {
    const rows = await this.sql.all<{ name: string; blobs: number; live_bytes: number }>('SELECT pack AS name, COUNT(*) AS blobs, SUM(length + ?) AS live_bytes FROM pack_blobs GROUP BY pack ORDER BY pack', [RECORD_HEAD]);
    return rows.map((r) => ({ name: r.name, blobs: Number(r.blobs), liveBytes: Number(r.live_bytes) }));
  }

  async inPack(pack: string): Promise<(Location & { id: ChunkId })[]> {
    return (await this.sql.all<Row>('SELECT id, pack, pack_offset, length FROM pack_blobs WHERE pack = ? ORDER BY pack_offset', [pack]))
      .map((r) => ({ id: chunkIdFromBytes(r.id), pack: r.pack, offset: Number(r.pack_offset), length: Number(r.length) }));
  }

  async stats(): Promise<{ chunks: number; bytes: number }> {
    const r = (await this.sql.get<{ chunks: number; bytes: number }>('SELECT COUNT(*) AS chunks, COALESCE(SUM(length), 0) AS bytes FROM pack_blobs'))!;
    return { chunks: Number(r.chunks), bytes: Number(r.bytes) };
  }

  async close(): Promise<void> {
    await this.sql.close();
  }
}

/** A PostgreSQL URL names a shared index; anything else is an SQLite file. */
export function isPostgresUrl(location: string): boolean {
  return /^postgres(ql)?:\/\//.test(location);
}
