import type { Statement } from 'better-sqlite3';
import { migrate, openSqlite, type Db } from './sqlite.js';
import type { Migration, Param, Row, SqlConn, SqlDb } from './driver.js';
import { Mutex } from './mutex.js';

/**
 * SQLite (better-sqlite3, synchronous) behind the async `SqlDb`. One connection: while a
 * transaction's body awaits, every other call waits for it (a FIFO mutex), so nothing slips into
 * someone else's transaction. With the mutex free a call runs at once, as before.
 */
export class SqliteSql implements SqlDb {
  readonly dialect = 'sqlite' as const;
  private readonly mutex = new Mutex();
  private readonly stmts = new Map<string, Statement>();

  constructor(readonly db: Db) {}

  static open(path: string): SqliteSql {
    return new SqliteSql(openSqlite(path));
  }

  private stmt(sql: string): Statement {
    let s = this.stmts.get(sql);
    if (!s) {
      s = this.db.prepare(sql);
      if (this.stmts.size > 500) this.stmts.clear();
      this.stmts.set(sql, s);
    }
    return s;
  }

  /** Runs `op` now, or after the transaction that holds the connection. */
  private async when<T>(op: () => T): Promise<T> {
    if (!this.mutex.held) return op();
    const release = await this.mutex.acquire();
    try {
      return op();
    } finally {
      release();
    }
  }

  allNow<T>(sql: string, params: readonly Param[]): T[] {
    return this.stmt(sql).all(...params) as T[];
  }
  getNow<T>(sql: string, params: readonly Param[]): T | undefined {
    return this.stmt(sql).get(...params) as T | undefined;
  }
  runNow(sql: string, params: readonly Param[]): number {
    return this.stmt(sql).run(...params).changes;
  }

  all<T = Row>(sql: string, params: readonly Param[] = []): Promise<T[]> {
    return this.when(() => this.allNow<T>(sql, params));
  }
  get<T = Row>(sql: string, params: readonly Param[] = []): Promise<T | undefined> {
    return this.when(() => this.getNow<T>(sql, params));
  }
  run(sql: string, params: readonly Param[] = []): Promise<number> {
    return this.when(() => this.runNow(sql, params));
  }

  async transaction<T>(fn: (c: SqlConn) => Promise<T>): Promise<T> {
    const release = await this.mutex.acquire();
    try {
      return await this.body(fn, 0);
    } finally {
      release();
    }
  }

  /** A transaction (depth 0) or a savepoint inside one, the connection held meanwhile. */
  async body<T>(fn: (c: SqlConn) => Promise<T>, depth: number): Promise<T> {
    this.db.exec(depth === 0 ? 'BEGIN IMMEDIATE' : `SAVEPOINT s${depth}`);
    try {
      const out = await fn(new SqliteTx(this, depth + 1));
      this.db.exec(depth === 0 ? 'COMMIT' : `RELEASE s${depth}`);
      return out;
    } catch (err) {
      if (this.db.inTransaction) this.db.exec(depth === 0 ? 'ROLLBACK' : `ROLLBACK TO s${depth}; RELEASE s${depth}`);
      throw err;
    }
  }

  async migrate(component: string, migrations: readonly Migration[]): Promise<number> {
    return this.when(() => migrate(this.db, component, migrations));
  }

  async close(): Promise<void> {
    const release = await this.mutex.acquire();
    this.db.close();
    release();
  }
}

/** The connection as seen inside a transaction: runs at once (the transaction holds the mutex). */
class SqliteTx implements SqlConn {
  readonly dialect = 'sqlite' as const;
  constructor(private readonly owner: SqliteSql, private readonly depth: number) {}
  async all<T = Row>(sql: string, params: readonly Param[] = []): Promise<T[]> {
    return this.owner.allNow<T>(sql, params);
  }
  async get<T = Row>(sql: string, params: readonly Param[] = []): Promise<T | undefined> {
    return this.owner.getNow<T>(sql, params);
  }
  async run(sql: string, params: readonly Param[] = []): Promise<number> {
    return this.owner.runNow(sql, params);
  }
  transaction<T>(fn: (c: SqlConn) => Promise<T>): Promise<T> {
    return this.owner.body(fn, this.depth);
  }
}
