/**
 * The one seam between Carryon's stores and a SQL engine (SQLite or PostgreSQL). Stores write
 * portable SQL with `?` placeholders; a driver runs it. Only stores (src/store, the scheduler's
 * store) use this: the broker sees domain methods.
 */
/** Arrays are for PostgreSQL (`= ANY(?)`, `unnest(?)`); SQLite takes scalars only. */
export type Param = string | number | bigint | Buffer | null | readonly Buffer[] | readonly string[] | readonly number[];
export type Row = Record<string, unknown>;
export type Dialect = 'sqlite' | 'postgres';

export interface SqlConn {
  readonly dialect: Dialect;
  all<T = Row>(sql: string, params?: readonly Param[]): Promise<T[]>;
  get<T = Row>(sql: string, params?: readonly Param[]): Promise<T | undefined>;
  /** Runs a statement; how many rows it changed. */
  run(sql: string, params?: readonly Param[]): Promise<number>;
  /**
   * Runs `fn` in one transaction (committed when it resolves, rolled back when it throws). A call
   * on a transaction's connection nests (a savepoint). `lock` names a lock held to the end of the
   * outermost transaction, across every process on the database: on PostgreSQL an advisory lock;
   * on SQLite every write transaction already excludes all others (BEGIN IMMEDIATE).
   */
  transaction<T>(fn: (c: SqlConn) => Promise<T>, lock?: string): Promise<T>;
}

/** One schema step. Steps of a component run once each, in order, inside a transaction. */
export interface Migration {
  version: number;
  /** SQLite's statements (and PostgreSQL's, where `postgres` is absent). */
  sql: string;
  postgres?: string;
}

export interface SqlDb extends SqlConn {
  /** Applies the component's steps that have not run yet (`schema_migrations(component, version)`). */
  migrate(component: string, migrations: readonly Migration[]): Promise<number>;
  close(): Promise<void>;
}

/** A unique or primary-key violation, on either engine. */
export function isUniqueViolation(err: unknown): boolean {
  const code = (err as { code?: unknown }).code;
  return code === '23505' || code === 'SQLITE_CONSTRAINT_UNIQUE' || code === 'SQLITE_CONSTRAINT_PRIMARYKEY';
}
