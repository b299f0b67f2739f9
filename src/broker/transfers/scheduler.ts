import { randomUUID, type KeyObject } from 'node:crypto';
import { signTicket } from '../../core/ticket.js';
import { migrate, type Db } from '../../store/sqlite.js';
import { assignJobs, orderQueue } from './assign.js';
import type { JobKind, JobRequest, JobState, JobView, TransferScheduler } from './types.js';

const MIGRATIONS = [
  {
    version: 1,
    sql: `
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
`,
  },
  {
    version: 2,
    sql: `
ALTER TABLE transfer_jobs ADD COLUMN base_manifests TEXT;
CREATE INDEX transfer_jobs_ended ON transfer_jobs(ended_at);
`,
  },
];

export interface SchedulerOptions {
  signingKey: KeyObject;
  ticketTtlSec?: number;
  pauseGraceSec?: number;
  heartbeatSec?: number;
  maxStreams?: number;
  now?: () => Date;
  /** Called after jobs end (finish, cancel): the embedded transfer server learns revocations at once. */
  onJobsEnded?: () => void;
}

interface JobRow {
  seq: number; id: string; kind: JobKind; checkout_id: string; desktop_id: string; manifests: string; wrapped_keys: string;
  key_context: string; state: JobState; server_id: string | null; paused_at: string | null; ticket_expires_at: string | null;
  base_manifests: string | null;
}
interface ServerRow { id: string; url: string; fingerprint: string; slots: number; last_heartbeat: string; bytes_in: number; bytes_out: number; rate_in: number; rate_out: number }

const SLOT_STATES = `('active','paused')`;

/**
 * Transfer-slot scheduler. The database is the truth (a broker restart loses nothing); every
 * call first sweeps (dead servers, expired tickets, long pauses), then fills free slots.
 */
export class SqliteScheduler implements TransferScheduler {
  private readonly ttl: number;
  private readonly grace: number;
  private readonly heartbeat: number;
  private readonly maxStreams: number;
  private readonly now: () => Date;

  constructor(private readonly db: Db, private readonly opts: SchedulerOptions) {
    migrate(db, 'transfers', MIGRATIONS);
    this.ttl = opts.ticketTtlSec ?? 600;
    this.grace = opts.pauseGraceSec ?? 300;
    this.heartbeat = opts.heartbeatSec ?? 5;
    this.maxStreams = opts.maxStreams ?? 4;
    this.now = opts.now ?? (() => new Date());
  }

  registerServer(s: { id: string; url: string; fingerprint: string; slots: number }): void {
    this.db.prepare(`INSERT INTO transfer_servers (id, url, fingerprint, slots, last_heartbeat) VALUES (?, ?, ?, ?, ?)
      ON CONFLICT(id) DO UPDATE SET url = excluded.url, fingerprint = excluded.fingerprint, slots = excluded.slots, last_heartbeat = excluded.last_heartbeat`)
      .run(s.id, s.url, s.fingerprint, s.slots, this.iso());
    this.pump();
  }

  serverHeartbeat(id: string, stats: { bytesIn: number; bytesOut: number }): boolean {
    const cur = this.db.prepare('SELECT * FROM transfer_servers WHERE id = ?').get(id) as ServerRow | undefined;
    if (!cur) return false;
    const dt = Math.max(0.001, (this.now().getTime() - Date.parse(cur.last_heartbeat)) / 1000);
    this.db.prepare('UPDATE transfer_servers SET last_heartbeat = ?, bytes_in = ?, bytes_out = ?, rate_in = ?, rate_out = ? WHERE id = ?').run(
      this.iso(), stats.bytesIn, stats.bytesOut, Math.max(0, (stats.bytesIn - cur.bytes_in) / dt), Math.max(0, (stats.bytesOut - cur.bytes_out) / dt), id);
    this.pump();
    return true;
  }

  enqueue(req: JobRequest): JobView {
    const id = randomUUID();
    this.db.prepare(`INSERT INTO transfer_jobs (id, kind, checkout_id, desktop_id, manifests, wrapped_keys, key_context, state, queued_at, base_manifests)
      VALUES (?, ?, ?, ?, ?, ?, ?, 'queued', ?, ?)`).run(id, req.kind, req.checkoutId, req.desktopId, JSON.stringify(req.manifests), req.wrappedKeys, req.keyContext, this.iso(),
      req.baseManifests ? JSON.stringify(req.baseManifests) : null);
    this.pump();
    return this.get(id)!;
  }

  get(jobId: string): JobView | null {
    let row = this.row(jobId);
    if (!row) return null;
    if (row.state === 'expired') {
      // The client came back after its ticket lapsed: it queues again and resumes where it was.
      this.db.prepare("UPDATE transfer_jobs SET state = 'queued', server_id = NULL WHERE id = ?").run(jobId);
    }
    this.pump();
    row = this.row(jobId)!;
    if (row.state === 'active') {
      this.db.prepare('UPDATE transfer_jobs SET ticket_expires_at = ? WHERE id = ?').run(this.isoIn(this.ttl), jobId);
      row = this.row(jobId)!;
    }
    return this.view(row);
  }

  pause(jobId: string): JobView | null {
    this.db.prepare("UPDATE transfer_jobs SET state = 'paused', paused_at = ? WHERE id = ? AND state = 'active'").run(this.iso(), jobId);
    return this.get(jobId);
  }

  resume(jobId: string): JobView | null {
    this.db.prepare("UPDATE transfer_jobs SET state = 'active', paused_at = NULL WHERE id = ? AND state = 'paused'").run(jobId);
    return this.get(jobId);
  }

  finish(jobId: string, outcome: 'done' | 'cancelled' | 'failed'): void {
    const n = this.db.prepare(`UPDATE transfer_jobs SET state = ?, ended_at = ? WHERE id = ? AND state IN ('queued','active','paused','expired')`).run(outcome, this.iso(), jobId).changes;
    this.pump();
    if (n) this.opts.onJobsEnded?.();
  }

  finishForCheckout(checkoutId: string, outcome: 'cancelled' | 'failed'): void {
    const n = this.db.prepare(`UPDATE transfer_jobs SET state = ?, ended_at = ? WHERE checkout_id = ? AND state IN ('queued','active','paused','expired')`).run(outcome, this.iso(), checkoutId).changes;
    this.pump();
    if (n) this.opts.onJobsEnded?.();
  }

  /** The checkout a job belongs to (for the holder check), or null. */
  checkoutOf(jobId: string): string | null {
    return this.row(jobId)?.checkout_id ?? null;
  }

  /**
   * Jobs whose tickets must stop working before they expire: every job that ended within one
   * ticket lifetime (older ones' tickets have expired anyway). Transfer servers get this list.
   */
  revokedJobIds(): string[] {
    const rows = this.db.prepare(`SELECT id FROM transfer_jobs WHERE state IN ('done','cancelled','failed') AND ended_at > ?`).all(this.isoIn(-this.ttl - 60)) as { id: string }[];
    return rows.map((r) => r.id);
  }

  /** Servers, slots in use, queue and throughput for `carryon admin transfers`. */
  overview(): { servers: { id: string; url: string; slots: number; inUse: number; alive: boolean; rateIn: number; rateOut: number; bytesIn: number; bytesOut: number }[]; queued: JobView[]; active: JobView[] } {
    this.pump();
    const servers = (this.db.prepare('SELECT * FROM transfer_servers ORDER BY id').all() as ServerRow[]).map((s) => ({
      id: s.id, url: s.url, slots: s.slots, inUse: this.inUse(s.id), alive: this.alive(s),
      rateIn: s.rate_in, rateOut: s.rate_out, bytesIn: s.bytes_in, bytesOut: s.bytes_out,
    }));
    const rows = this.db.prepare(`SELECT * FROM transfer_jobs WHERE state IN ('queued','active','paused') ORDER BY seq`).all() as JobRow[];
    return {
      servers,
      queued: orderQueue(rows.filter((r) => r.state === 'queued').map((r) => ({ ...r, kind: r.kind }))).map((r) => this.view(r, false)),
      active: rows.filter((r) => r.state !== 'queued').map((r) => this.view(r, false)),
    };
  }

  /** Unfinished jobs with what they belong to (for the admin views). */
  openJobs(): { id: string; kind: JobKind; state: JobState; checkoutId: string; desktopId: string; serverId: string | null; manifests: string[]; queuedAt: string }[] {
    const rows = this.db.prepare(`SELECT * FROM transfer_jobs WHERE state IN ('queued','active','paused','expired') ORDER BY seq`).all() as (JobRow & { queued_at: string })[];
    return rows.map((r) => ({ id: r.id, kind: r.kind, state: r.state, checkoutId: r.checkout_id, desktopId: r.desktop_id, serverId: r.server_id, manifests: JSON.parse(r.manifests) as string[], queuedAt: r.queued_at }));
  }

  /** Sweeps and assigns, atomically. Called on every scheduler operation. */
  pump(): void {
    this.db.transaction(() => {
      const dead = (this.db.prepare('SELECT * FROM transfer_servers').all() as ServerRow[]).filter((s) => !this.alive(s)).map((s) => s.id);
      for (const id of dead) this.db.prepare(`UPDATE transfer_jobs SET state = 'queued', server_id = NULL WHERE server_id = ? AND state IN ${SLOT_STATES}`).run(id);
      this.db.prepare("UPDATE transfer_jobs SET state = 'expired', server_id = NULL WHERE state = 'active' AND ticket_expires_at < ?").run(this.iso());
      this.db.prepare("UPDATE transfer_jobs SET state = 'queued', server_id = NULL, paused_at = NULL WHERE state = 'paused' AND paused_at < ?").run(this.isoIn(-this.grace));
      const servers = (this.db.prepare('SELECT * FROM transfer_servers').all() as ServerRow[]).filter((s) => this.alive(s)).map((s) => ({ id: s.id, slots: s.slots, active: this.inUse(s.id) }));
      const queue = this.db.prepare("SELECT id, kind, seq FROM transfer_jobs WHERE state = 'queued'").all() as { id: string; kind: JobKind; seq: number }[];
      for (const a of assignJobs(servers, queue)) {
        this.db.prepare("UPDATE transfer_jobs SET state = 'active', server_id = ?, started_at = ?, ticket_expires_at = ? WHERE id = ?").run(a.serverId, this.iso(), this.isoIn(this.ttl), a.jobId);
      }
    })();
  }

  private view(row: JobRow, withTicket = true): JobView {
    const view: JobView = { id: row.id, kind: row.kind, state: row.state };
    if (row.state === 'queued') {
      const queue = orderQueue(this.db.prepare("SELECT id, kind, seq FROM transfer_jobs WHERE state = 'queued'").all() as { id: string; kind: JobKind; seq: number }[]);
      view.queuePosition = queue.findIndex((q) => q.id === row.id) + 1;
    }
    if (withTicket && (row.state === 'active' || row.state === 'paused') && row.server_id) {
      const server = this.db.prepare('SELECT * FROM transfer_servers WHERE id = ?').get(row.server_id) as ServerRow;
      const expiresAt = row.ticket_expires_at ?? this.isoIn(this.ttl);
      const ticket = signTicket({
        v: 1, jobId: row.id, desktopId: row.desktop_id, checkoutId: row.checkout_id,
        direction: row.kind === 'checkout' ? 'download' : 'upload', manifests: JSON.parse(row.manifests) as string[],
        ...(row.base_manifests ? { baseManifests: JSON.parse(row.base_manifests) as string[] } : {}),
        wrappedKeys: row.wrapped_keys, keyContext: row.key_context, transferServerId: server.id, maxStreams: this.maxStreams, expiresAt,
      }, this.opts.signingKey);
      view.transfer = { url: server.url, fingerprint: server.fingerprint, ticket, ticketExpiresAt: expiresAt, maxStreams: this.maxStreams };
    }
    return view;
  }

  private row(id: string): JobRow | undefined {
    return this.db.prepare('SELECT * FROM transfer_jobs WHERE id = ?').get(id) as JobRow | undefined;
  }
  private inUse(serverId: string): number {
    return (this.db.prepare(`SELECT COUNT(*) AS n FROM transfer_jobs WHERE server_id = ? AND state IN ${SLOT_STATES}`).get(serverId) as { n: number }).n;
  }
  private alive(s: ServerRow): boolean {
    return this.now().getTime() - Date.parse(s.last_heartbeat) <= 3 * this.heartbeat * 1000;
  }
  private iso(): string {
    return this.now().toISOString();
  }
  private isoIn(sec: number): string {
    return new Date(this.now().getTime() + sec * 1000).toISOString();
  }
}
