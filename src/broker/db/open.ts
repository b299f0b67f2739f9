import { join } from 'node:path';
import { sealChainAtOpen } from './audit-chain.js';
import { BROKER_MIGRATIONS } from './metadata-schema.js';
import type { SqlDb } from '../../sql/driver.js';
import { PgSql } from '../../sql/pg-driver.js';
import { SqliteSql } from '../../sql/sqlite-driver.js';
import { TRUST_MIGRATIONS } from './trust-schema.js';
import { SqlMetadataStore } from './sql-store.js';
import type { MetadataStore } from './types.js';

export interface OpenedMetadata {
  meta: MetadataStore;
  /** The connection (or pool), for the other stores that live in the same database. */
  sql: SqlDb;
}

/**
 * The broker's database: `database` a `postgres://` URL (several brokers may share it), or
 * absent for SQLite in `<dataDir>/metadata.db` (the default). Migrated and ready; `auditKey`
 * (`auditChainKey(masterKey)`) keys the audit chain.
 */
export async function openMetadata(opts: { dataDir: string; database?: string; auditKey: Buffer; by?: string }): Promise<OpenedMetadata> {
  const sql: SqlDb = opts.database ? await PgSql.open(opts.database) : SqliteSql.open(join(opts.dataDir, 'metadata.db'));
  try {
    await sql.migrate('broker', BROKER_MIGRATIONS);
    await sql.migrate('trust', TRUST_MIGRATIONS);
    await sealChainAtOpen(sql, opts.auditKey, opts.by ?? 'system');
  } catch (err) {
    await sql.close();
    throw err;
  }
  return { meta: new SqlMetadataStore(sql, opts.auditKey), sql };
}
