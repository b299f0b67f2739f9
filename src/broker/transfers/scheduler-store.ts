import type { Migration, SqlConn, SqlDb } from '../../sql/driver.js';
import { postgresDdl } from '../db/metadata-schema.js';
import type { JobKind, JobRequest, JobState } from './types.js';

const V1 = `
CREATE TABLE transfer_servers (
  id TEXT PRIMARY KEY, url TEXT NOT NULL, fingerprint TEXT NOT NULL, slots INTEGER NOT NULL CHECK (slots > 0),
  last_heartbeat TEXT NOT NULL, bytes_in INTEGER NOT NULL DEFAULT 0, bytes_out INTEGER NOT NULL DEFAULT 0,
  rate_in REAL NOT NULL DEFAULT 0, rate_out REAL NOT NULL DEFAULT 0);
CREATE TABLE transfer_jobs (
  seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, kind TEXT NOT NULL, checkout_id TEXT NOT NULL,
  desktop_id TEXT NOT NULL, manifests TEXT NOT NULL, wrapped_keys TEXT NOT NULL, key_context TEXT NOT NULL,
  state TEXT NOT NULL, server_id TEXT, queued_at TEXT NOT NULL, started_at TEXT, paused_at TEXT,
  ticket_expires_at TEXT, ended_at TEXT);
CREATE INDEX transfer_jobs_state ON transfer_jobs(state, seq);
`;

export const SCHEDULER_MIGRATIONS: Migration[] = [
  // Byte counters are BIGINT on PostgreSQL (SQLite's INTEGER is 64-bit already), rates double.
  { version: 1, sql: V1, postgres: postgresDdl(V1).replace(/bytes_(in|out) INTEGER/g, 'bytes_$1 BIGINT').replace(/\bREAL\b/g, 'DOUBLE PRECISION') },
  {
    version: 2,
    sql: `
ALTER TABLE transfer_jobs ADD COLUMN base_manifests TEXT;
CREATE INDEX transfer_jobs_ended ON transfer_jobs(ended_at);
`,
  },
  // The server set the last gateway config was made for (one row): "out of date" when it differs.
  { version: 3, sql: 'CREATE TABLE gateway_config (id INTEGER PRIMARY KEY, servers_hash TEXT NOT NULL, made_at TEXT NOT NULL);' },
  // A background replica (the agent's, on schedule): queued after the rest, and its ticket tells
  // the transfer server to rebuild its chunks in the idle CPU class.
  { version: 4, sql: 'ALTER TABLE transfer_jobs ADD COLUMN background INTEGER NOT NULL DEFAULT 0;' },
];

export interface JobRow {
  seq: number; id: string; kind: JobKind; checkout_id: string; desktop_id: string; manifests: string; wrapped_keys: string;
  key_context: string; state: JobState; server_id: string | null; queued_at: string; paused_at: string | null; ticket_expires_at: string | null;
  base_manifests: string | null; background: number;
}
export interface ServerRow { id: string; url: string; fingerprint: string; slots: number; last_heartbeat: string; bytes_in: number; bytes_out: number; rate_in: number; rate_out: number }
export interface QueueEntry { id: string; kind: JobKind; seq: number; background: boolean }

const SLOT_STATES = `('active','paused')`;
const OPEN_STATES = `('queued','active','paused','expired')`;
const LOCK = 'carryon:transfer-scheduler';

/** Numbers come back as numbers from either engine (REAL/DOUBLE, BIGINT). */
function server(r: ServerRow): ServerRow {
  return { ...r, slots: Number(r.slots), bytes_in: Number(r.bytes_in), bytes_out: Number(r.bytes_out), rate_in: Number(r.rate_in), rate_out: Number(r.rate_out) };
}
function job(r: JobRow): JobRow {
  return { ...r, seq: Number(r.seq), background: Number(r.background) };
}

/** What a sweep needs to know: now, and the cut-offs for dead servers, expired tickets, long pauses. */
export interface SweepTimes {
  now: string;
  /** Servers whose last heartbeat is older are dead. */
  aliveSince: string;
  /** Paused jobs paused before this go back to the queue. */
  pausedBefore: string;
  /** Ticket expiry for jobs started now. */
  ticketUntil: string;
}

/** The scheduler's tables (servers, jobs) behind domain methods, on SQLite or PostgreSQL. */
export class SchedulerStore {
  constructor(private readonly sql: SqlConn) {}

  static async open(sql: SqlDb): Promise<SchedulerStore> {
    await sql.migrate('transfers', SCHEDULER_MIGRATIONS);
    return new SchedulerStore(sql);
  }

  async upsertServer(s: { id: string; url: string; fingerprint: string; slots: number }, at: string): Promise<void> {
    await this.sql.run(`INSERT INTO transfer_servers (id, url, fingerprint, slots, last_heartbeat) VALUES (?, ?, ?, ?, ?)
      ON CONFLICT(id) DO UPDATE SET url = excluded.url, fingerprint = excluded.fingerprint, slots = excluded.slots, last_heartbeat = excluded.last_heartbeat`,
    [s.id, s.url, s.fingerprint, s.slots, at]);
  }
  async server(id: string): Promise<ServerRow | undefined> {
    const r = await this.sql.get<ServerRow>('SELECT * FROM transfer_servers WHERE id = ?', [id]);
    return r && server(r);
  }
  async servers(): Promise<ServerRow[]> {
    return (await this.sql.all<ServerRow>('SELECT * FROM transfer_servers ORDER BY id')).map(server);
  }
  async serverStats(id: string, at: string, s: { bytesIn: number; bytesOut: number; rateIn: number; rateOut: number }): Promise<void> {
    await this.sql.run('UPDATE transfer_servers SET last_heartbeat = ?, bytes_in = ?, bytes_out = ?, rate_in = ?, rate_out = ? WHERE id = ?',
      [at, s.bytesIn, s.bytesOut, s.rateIn, s.rateOut, id]);
  }
  /** A server that said goodbye: dead from now on, so the next sweep moves its jobs elsewhere. */
  async retireServer(id: string): Promise<void> {
    await this.sql.run('UPDATE transfer_servers SET last_heartbeat = ? WHERE id = ?', [new Date(0).toISOString(), id]);
  }
  async gatewayConfigMade(hash: string, at: string): Promise<void> {
    await this.sql.run(`INSERT INTO gateway_config (id, servers_hash, made_at) VALUES (1, ?, ?)
      ON CONFLICT(id) DO UPDATE SET servers_hash = excluded.servers_hash, made_at = excluded.made_at`, [hash, at]);
  }
  async gatewayConfig(): Promise<{ hash: string; madeAt: string } | null> {
    const r = await this.sql.get<{ servers_hash: string; made_at: string }>('SELECT servers_hash, made_at FROM gateway_config WHERE id = 1');
    return r ? { hash: r.servers_hash, madeAt: r.made_at } : null;
  }
  async inUse(serverId: string): Promise<number> {
    return Number((await this.sql.get<{ n: number }>(`SELECT COUNT(*) AS n FROM transfer_jobs WHERE server_id = ? AND state IN ${SLOT_STATES}`, [serverId]))!.n);
  }

  async insertJob(id: string, req: JobRequest, at: string): Promise<void> {
    await this.sql.run(`INSERT INTO transfer_jobs (id, kind, checkout_id, desktop_id, manifests, wrapped_keys, key_context, state, queued_at, base_manifests, background)
      VALUES (?, ?, ?, ?, ?, ?, ?, 'queued', ?, ?, ?)`, [id, req.kind, req.checkoutId, req.desktopId, JSON.stringify(req.manifests), req.wrappedKeys, req.keyContext, at,
      req.baseManifests ? JSON.stringify(req.baseManifests) : null, req.background ? 1 : 0]);
  }
  async job(id: string): Promise<JobRow | undefined> {
    const r = await this.sql.get<JobRow>('SELECT * FROM transfer_jobs WHERE id = ?', [id]);
    return r && job(r);
  }
  /** Every job with where and when it ran, oldest first (audits of slot use; tests). */
  async history(): Promise<{ id: string; kind: string; state: string; server: string | null; startedAt: string | null; endedAt: string | null }[]> {
    const rows = await this.sql.all<{ id: string; kind: string; state: string; server_id: string | null; started_at: string | null; ended_at: string | null }>('SELECT id, kind, state, server_id, started_at, ended_at FROM transfer_jobs ORDER BY seq', []);
    return rows.map((r) => ({ id: r.id, kind: r.kind, state: r.state, server: r.server_id, startedAt: r.started_at, endedAt: r.ended_at }));
  }
  /** An expired job whose client came back: queued again (it resumes where it was). */
  async requeueExpired(id: string): Promise<void> {
    await this.sql.run("UPDATE transfer_jobs SET state = 'queued', server_id = NULL WHERE id = ? AND state = 'expired'", [id]);
  }
  async renewTicket(id: string, until: string): Promise<void> {
    await this.sql.run("UPDATE transfer_jobs SET ticket_expires_at = ? WHERE id = ? AND state = 'active'", [until, id]);
  }
  async pause(id: string, at: string): Promise<void> {
    await this.sql.run("UPDATE transfer_jobs SET state = 'paused', paused_at = ? WHERE id = ? AND state = 'active'", [at, id]);
  }
  async resume(id: string): Promise<void> {
    await this.sql.run("UPDATE transfer_jobs SET state = 'active', paused_at = NULL WHERE id = ? AND state = 'paused'", [id]);
  }
  /** Ends an unfinished job; how many ended (0 or 1). */
  async end(id: string, outcome: JobState, at: string): Promise<number> {
    return this.sql.run(`UPDATE transfer_jobs SET state = ?, ended_at = ? WHERE id = ? AND state IN ${OPEN_STATES}`, [outcome, at, id]);
  }
  async endForCheckout(checkoutId: string, outcome: JobState, at: string): Promise<number> {
    return this.sql.run(`UPDATE transfer_jobs SET state = ?, ended_at = ? WHERE checkout_id = ? AND state IN ${OPEN_STATES}`, [outcome, at, checkoutId]);
  }
  async endedSince(at: string): Promise<string[]> {
    return (await this.sql.all<{ id: string }>(`SELECT id FROM transfer_jobs WHERE state IN ('done','cancelled','failed') AND ended_at > ?`, [at])).map((r) => r.id);
  }
  /** Queued, active and paused jobs (with `expired` ones too where `withExpired`), oldest first. */
  async openJobs(withExpired: boolean): Promise<JobRow[]> {
    const states = withExpired ? OPEN_STATES : `('queued','active','paused')`;
    return (await this.sql.all<JobRow>(`SELECT * FROM transfer_jobs WHERE state IN ${states} ORDER BY seq`)).map(job);
  }
  async queue(): Promise<QueueEntry[]> {
    return (await this.sql.all<Omit<QueueEntry, 'background'> & { background: number }>("SELECT id, kind, seq, background FROM transfer_jobs WHERE state = 'queued'"))
      .map((q) => ({ ...q, seq: Number(q.seq), background: Number(q.background) === 1 }));
  }

  /**
   * One sweep and assignment, atomic and serialised across every broker on the database (a lock
   * for the whole step: two brokers never hand out the same slot). `alive` judges a server,
   * `assign` picks which queued jobs start where.
   */
  async sweepAndAssign(times: () => SweepTimes, assign: (servers: { id: string; slots: number; active: number }[], queue: QueueEntry[]) => { jobId: string; serverId: string }[]): Promise<void> {
    await this.sql.transaction(async (c) => {
      const t = times();
      const tx = new SchedulerStore(c);
      const all = await tx.servers();
      for (const s of all.filter((x) => x.last_heartbeat < t.aliveSince)) {
        await c.run(`UPDATE transfer_jobs SET state = 'queued', server_id = NULL WHERE server_id = ? AND state IN ${SLOT_STATES}`, [s.id]);
      }
      await c.run("UPDATE transfer_jobs SET state = 'expired', server_id = NULL WHERE state = 'active' AND ticket_expires_at < ?", [t.now]);
      await c.run("UPDATE transfer_jobs SET state = 'queued', server_id = NULL, paused_at = NULL WHERE state = 'paused' AND paused_at < ?", [t.pausedBefore]);
      const live = [];
      for (const s of all.filter((x) => x.last_heartbeat >= t.aliveSince)) live.push({ id: s.id, slots: s.slots, active: await tx.inUse(s.id) });
      const queue = await tx.queue();
      if (!queue.length) return;
      // Starts are stamped after the slots were counted: a slot another broker's end freed was
      // freed (and stamped) before this, so one server's job intervals never overlap past its slots.
      const at = times();
      for (const a of assign(live, queue)) {
        await c.run("UPDATE transfer_jobs SET state = 'active', server_id = ?, started_at = ?, ticket_expires_at = ? WHERE id = ? AND state = 'queued'", [a.serverId, at.now, at.ticketUntil, a.jobId]);
      }
    }, LOCK);
  }
}
