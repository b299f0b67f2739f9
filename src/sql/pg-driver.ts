import pg from 'pg';
import { CarryonError } from '../core/errors.js';
import type { Migration, Param, Row, SqlConn, SqlDb } from './driver.js';

/** `postgres://user:secret@host/db` → `postgres://user:***@host/db`, for messages and logs. */
export function redactDatabaseUrl(url: string): string {
  try {
    const u = new URL(url);
    if (u.password) u.password = '***';
    return u.toString();
  } catch {
    return '(unparsable database URL)';
  }
}

/** Checks a `postgres://` / `postgresql://` URL; a clear error (never echoing a password) if wrong. */
export function checkPostgresUrl(url: string): URL {
  let u: URL;
  try {
    u = new URL(url);
  } catch {
    throw new CarryonError('bad-config', 'the database must be a URL such as postgres://user@host:5432/carryon (the given value does not parse)');
  }
  if (u.protocol !== 'postgres:' && u.protocol !== 'postgresql:') {
    throw new CarryonError('bad-config', `the database URL must start with postgres:// or postgresql://, not ${u.protocol}//`);
  }
  if (!u.hostname && !u.searchParams.get('host')) throw new CarryonError('bad-config', `database URL ${redactDatabaseUrl(url)} names no host`);
  if (u.pathname.length <= 1) throw new CarryonError('bad-config', `database URL ${redactDatabaseUrl(url)} names no database (…/carryon)`);
  return u;
}

/** `?` placeholders (outside quoted strings) → `$1, $2, …`. */
export function numberPlaceholders(sql: string): string {
  let n = 0;
  let quoted = false;
  let out = '';
  for (const ch of sql) {
    if (ch === "'") quoted = !quoted;
    out += ch === '?' && !quoted ? `$${++n}` : ch;
  }
  return out;
}

const converted = new Map<string, string>();
function text(sql: string): string {
  let t = converted.get(sql);
  if (t === undefined) {
    t = numberPlaceholders(sql);
    if (converted.size > 2000) converted.clear();
    converted.set(sql, t);
  }
  return t;
}

// BIGINT / BIGSERIAL ids, COUNT(*) and SUM(...) as numbers (all well inside 2^53 here).
const asNumber = (v: string) => Number(v);
const types = {
  getTypeParser: ((oid: number, format?: 'text' | 'binary') =>
    oid === 20 || oid === 1700 ? asNumber : pg.types.getTypeParser(oid, format ?? 'text')) as typeof pg.types.getTypeParser,
};

async function onClient(c: pg.Pool | pg.PoolClient, sql: string, params: readonly Param[]): Promise<pg.QueryResult> {
  return c.query(text(sql), params as Param[]);
}

/** PostgreSQL through a `pg` pool. */
export class PgSql implements SqlDb {
  readonly dialect = 'postgres' as const;

  private constructor(private readonly pool: pg.Pool) {}

  static async open(url: string, opts: { max?: number } = {}): Promise<PgSql> {
    checkPostgresUrl(url);
    const pool = new pg.Pool({ connectionString: url, max: opts.max ?? 10, types, idleTimeoutMillis: 10_000 });
    // An idle connection the server dropped: the pool replaces it; say so without the URL.
    pool.on('error', (err) => process.stderr.write(`carryon: PostgreSQL connection lost: ${err.message}\n`));
    try {
      await pool.query('SELECT 1');
    } catch (err) {
      await pool.end().catch(() => undefined);
      throw new CarryonError('bad-config', `cannot connect to PostgreSQL at ${redactDatabaseUrl(url)}: ${(err as Error).message}`);
    }
    return new PgSql(pool);
  }

  async all<T = Row>(sql: string, params: readonly Param[] = []): Promise<T[]> {
    return (await onClient(this.pool, sql, params)).rows as T[];
  }
  async get<T = Row>(sql: string, params: readonly Param[] = []): Promise<T | undefined> {
    return (await onClient(this.pool, sql, params)).rows[0] as T | undefined;
  }
  async run(sql: string, params: readonly Param[] = []): Promise<number> {
    return (await onClient(this.pool, sql, params)).rowCount ?? 0;
  }

  async transaction<T>(fn: (c: SqlConn) => Promise<T>, lock?: string): Promise<T> {
    const client = await this.pool.connect();
    try {
      await client.query('BEGIN');
      const tx = new PgTx(client, 1);
      if (lock) await tx.lock(lock);
      const out = await fn(tx);
      await client.query('COMMIT');
      return out;
    } catch (err) {
      await client.query('ROLLBACK').catch(() => undefined);
      throw err;
    } finally {
      client.release();
    }
  }

  async migrate(component: string, migrations: readonly Migration[]): Promise<number> {
    // Several brokers may start at once on one database: one migrates, the others then see it done.
    return this.transaction(async (c) => {
      const tx = c as PgTx;
      await tx.exec(`CREATE TABLE IF NOT EXISTS schema_migrations (
        component TEXT NOT NULL, version INTEGER NOT NULL, applied_at TEXT NOT NULL, PRIMARY KEY (component, version))`);
      const done = new Set((await tx.all<{ version: number }>('SELECT version FROM schema_migrations WHERE component = ?', [component])).map((r) => r.version));
      let applied = 0;
      for (const m of [...migrations].sort((a, b) => a.version - b.version)) {
        if (done.has(m.version)) continue;
        await tx.exec(m.postgres ?? m.sql);
        await tx.run('INSERT INTO schema_migrations (component, version, applied_at) VALUES (?, ?, ?)', [component, m.version, new Date().toISOString()]);
        applied++;
      }
      return applied;
    }, 'carryon:migrate');
  }

  async close(): Promise<void> {
    await this.pool.end();
  }
}

class PgTx implements SqlConn {
  readonly dialect = 'postgres' as const;
  constructor(private readonly client: pg.PoolClient, private readonly depth: number) {}
  async all<T = Row>(sql: string, params: readonly Param[] = []): Promise<T[]> {
    return (await onClient(this.client, sql, params)).rows as T[];
  }
  async get<T = Row>(sql: string, params: readonly Param[] = []): Promise<T | undefined> {
    return (await onClient(this.client, sql, params)).rows[0] as T | undefined;
  }
  async run(sql: string, params: readonly Param[] = []): Promise<number> {
    return (await onClient(this.client, sql, params)).rowCount ?? 0;
  }
  /** Several statements, no parameters (migrations). */
  async exec(sql: string): Promise<void> {
    await this.client.query(sql);
  }
  /** A lock across every connection to the database, held until the outermost transaction ends. */
  async lock(name: string): Promise<void> {
    await this.client.query('SELECT pg_advisory_xact_lock(hashtext($1))', [name]);
  }
  async transaction<T>(fn: (c: SqlConn) => Promise<T>, lock?: string): Promise<T> {
    const sp = `s${this.depth}`;
    await this.client.query(`SAVEPOINT ${sp}`);
    try {
      if (lock) await this.lock(lock);
      const out = await fn(new PgTx(this.client, this.depth + 1));
      await this.client.query(`RELEASE SAVEPOINT ${sp}`);
      return out;
    } catch (err) {
      await this.client.query(`ROLLBACK TO SAVEPOINT ${sp}`).catch(() => undefined);
      throw err;
    }
  }
}
