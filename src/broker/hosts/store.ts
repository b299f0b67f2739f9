import { randomUUID } from 'node:crypto';
import type { Migration, SqlConn, SqlDb } from '../../sql/driver.js';
import { KeyedWaiters } from '../keyed-waiters.js';

/**
 * Desktop hosts (issue 26): the machines that run desktops online, where each desktop is placed,
 * and the commands waiting for each host. A component of its own ("hosts"), versioned apart from
 * the broker's tables; the same DDL on SQLite and PostgreSQL.
 *
 * A placement is one row per desktop (its primary key decides a race between two power-ons). It
 * stays after the guest stops: the host keeps the chain, and with it what the guest wrote since the
 * snapshot, which no check-out may skip over (see power.ts).
 */
const V1 = `
CREATE TABLE hosts (
  id TEXT PRIMARY KEY, display_url TEXT, vcpus INTEGER NOT NULL, ram_mib INTEGER NOT NULL, max_desktops INTEGER NOT NULL,
  accel TEXT NOT NULL, heartbeat_sec INTEGER NOT NULL, registered_at TEXT NOT NULL, last_seen TEXT NOT NULL,
  health TEXT NOT NULL DEFAULT 'ok', report TEXT NOT NULL DEFAULT '{}');
CREATE TABLE host_placements (
  desktop_id TEXT PRIMARY KEY, host_id TEXT NOT NULL, state TEXT NOT NULL, snapshot_id TEXT, vcpus INTEGER NOT NULL,
  ram_mib INTEGER NOT NULL, job_id TEXT, since TEXT NOT NULL, updated_at TEXT NOT NULL, detail TEXT);
CREATE TABLE host_commands (
  id TEXT PRIMARY KEY, host_id TEXT NOT NULL, desktop_id TEXT NOT NULL, type TEXT NOT NULL, state TEXT NOT NULL DEFAULT 'pending',
  result TEXT, created_at TEXT NOT NULL, acked_at TEXT);
CREATE INDEX host_commands_pending ON host_commands(host_id, state, created_at);
`;

/** One-time display tickets (`carryon open`): only their hash is kept; `used_at` is set once, by the connection that consumes it. */
const V2 = `
CREATE TABLE display_tickets (
  hash TEXT PRIMARY KEY, user_name TEXT NOT NULL, desktop_id TEXT NOT NULL, expires_at TEXT NOT NULL, created_at TEXT NOT NULL, used_at TEXT);
`;

/**
 * A check-out of a desktop on a host (item 4): the host shuts the guest down and sends back what it
 * wrote; `step` says how far it got (the laptop polls it; the audit has each step too).
 */
const V3 = `
CREATE TABLE host_handovers (
  checkout_id TEXT PRIMARY KEY, desktop_id TEXT NOT NULL, host_id TEXT NOT NULL, base_snapshot TEXT NOT NULL, was TEXT NOT NULL,
  step TEXT NOT NULL, detail TEXT, job_id TEXT, created_at TEXT NOT NULL, updated_at TEXT NOT NULL);
CREATE INDEX host_handovers_desktop ON host_handovers(desktop_id, created_at);
`;

/**
 * Fail-over (item 6): a lost host's copy of a desktop that an admin started elsewhere. The host
 * keeps that chain (what the guest wrote there is at risk, never silently dropped) until an admin
 * releases it; it is never chosen for that desktop meanwhile.
 */
const V4 = `
CREATE TABLE host_kept (
  desktop_id TEXT NOT NULL, host_id TEXT NOT NULL, snapshot_id TEXT, since TEXT NOT NULL, reason TEXT, PRIMARY KEY (desktop_id, host_id));
`;

/**
 * Each host's own credential (no shared secret: one stolen host cannot act for another): only a
 * hash bound to the host id is kept (credentials.ts). And the replicas a host committed, by job: a
 * host that did not hear the answer asks again and is told the snapshot (replica.ts).
 */
const V5 = `
CREATE TABLE host_keys (host_id TEXT PRIMARY KEY, hash TEXT NOT NULL, made_at TEXT NOT NULL, made_by TEXT NOT NULL);
CREATE TABLE host_replica_commits (
  job_id TEXT PRIMARY KEY, desktop_id TEXT NOT NULL, host_id TEXT NOT NULL, snapshot_id TEXT NOT NULL, committed_at TEXT NOT NULL);
`;

/**
 * The laptop's download job for the snapshot the host ran from, opened with the handover: the
 * chunks the guest did not change travel while the host shuts down (ended at the commit or cancel).
 */
const V6 = `ALTER TABLE host_handovers ADD COLUMN prefetch_job_id TEXT;`;

export const HOST_MIGRATIONS: Migration[] = [{ version: 1, sql: V1 }, { version: 2, sql: V2 }, { version: 3, sql: V3 }, { version: 4, sql: V4 }, { version: 5, sql: V5 }, { version: 6, sql: V6 }];

/**
 * `starting`: told to start; `running`: the host says QEMU runs; `stopping`; `stopped`: off, its chain kept on the host;
 * `returning`: shut down and sent back for a check-out (a handover); `lost`: the host stopped answering while it ran.
 */
export type PlacementState = 'starting' | 'running' | 'stopping' | 'stopped' | 'returning' | 'lost';
export const ON_HOST: readonly PlacementState[] = ['starting', 'running', 'stopping', 'returning'];
export type HostCommandType = 'start' | 'off' | 'shutdown' | 'reset' | 'discard' | 'display' | 'handover';

/** `asked`: the command is queued; `shutting-down`: the host took it; `sending`: the guest is off, its pages travel; then one of the ends. */
export type HandoverStep = 'asked' | 'shutting-down' | 'sending' | 'done' | 'failed' | 'cancelled';
export interface HandoverRow {
  checkoutId: string; desktopId: string; hostId: string; baseSnapshot: string; was: 'running' | 'stopped'; step: HandoverStep; detail: string | null;
  jobId: string | null; prefetchJobId: string | null; createdAt: string; updatedAt: string;
}

export interface HostRow {
  id: string; displayUrl: string | null; vcpus: number; ramMiB: number; maxDesktops: number; accel: string; heartbeatSec: number;
  /** `retired`: it said goodbye (a clean stop); `lost`: it went silent. */
  registeredAt: string; lastSeen: string; health: 'ok' | 'lost' | 'retired'; report: HostReport;
}
/** What a host says at each heartbeat (kept as sent, for the admin view). */
export interface HostReport {
  desktops?: { desktopId: string; state: string; pid?: number; detail?: string }[];
  bases?: string[];
  freeDiskBytes?: number;
}
export interface PlacementRow {
  desktopId: string; hostId: string; state: PlacementState; snapshotId: string | null; vcpus: number; ramMiB: number; jobId: string | null;
  since: string; updatedAt: string; detail: string | null;
}
export interface KeptRow { desktopId: string; hostId: string; snapshotId: string | null; since: string; reason: string | null }
export interface HostCommandRow { id: string; hostId: string; desktopId: string; type: HostCommandType; state: string; result: string | null; createdAt: string }

type Raw = Record<string, unknown>;
const str = (v: unknown): string | null => (v === null || v === undefined ? null : String(v));
const now = () => new Date().toISOString();

function hostRow(r: Raw): HostRow {
  return {
    id: String(r.id), displayUrl: str(r.display_url), vcpus: Number(r.vcpus), ramMiB: Number(r.ram_mib), maxDesktops: Number(r.max_desktops), accel: String(r.accel),
    heartbeatSec: Number(r.heartbeat_sec), registeredAt: String(r.registered_at), lastSeen: String(r.last_seen), health: r.health === 'lost' || r.health === 'retired' ? r.health : 'ok',
    report: JSON.parse(String(r.report)) as HostReport,
  };
}
function placementRow(r: Raw): PlacementRow {
  return {
    desktopId: String(r.desktop_id), hostId: String(r.host_id), state: String(r.state) as PlacementState, snapshotId: str(r.snapshot_id), vcpus: Number(r.vcpus),
    ramMiB: Number(r.ram_mib), jobId: str(r.job_id), since: String(r.since), updatedAt: String(r.updated_at), detail: str(r.detail),
  };
}
function handoverRow(r: Raw): HandoverRow {
  return {
    checkoutId: String(r.checkout_id), desktopId: String(r.desktop_id), hostId: String(r.host_id), baseSnapshot: String(r.base_snapshot), was: r.was === 'running' ? 'running' : 'stopped',
    step: String(r.step) as HandoverStep, detail: str(r.detail), jobId: str(r.job_id), prefetchJobId: str(r.prefetch_job_id), createdAt: String(r.created_at), updatedAt: String(r.updated_at),
  };
}
function commandRow(r: Raw): HostCommandRow {
  return { id: String(r.id), hostId: String(r.host_id), desktopId: String(r.desktop_id), type: String(r.type) as HostCommandType, state: String(r.state), result: str(r.result), createdAt: String(r.created_at) };
}

/** The hosts' tables behind domain methods. Every check-and-set is one statement. */
export class HostStore {
  /** Told of each command queued here (the hosts' long polls wake at once; this process only). */
  private readonly queued = new Set<(hostId: string) => void>();
  /** The laptops' long polls on a handover's step, by check-out (this process only: they re-read too). */
  private readonly stepWaiters = new KeyedWaiters();
  constructor(private readonly sql: SqlConn) {}

  /** Settles when the handover of `checkoutId` moves here (or its check-out ends), after `ms`, or on `signal`; registered at once (call it before reading). */
  handoverWaiter(checkoutId: string, ms: number, signal?: AbortSignal): Promise<void> {
    return this.stepWaiters.wait(checkoutId, ms, signal);
  }
  /** Wakes the long polls on this check-out's handover (a step moved, or the check-out ended). */
  wakeHandover(checkoutId: string): void {
    this.stepWaiters.wake(checkoutId);
  }

  onQueued(fn: (hostId: string) => void): void {
    this.queued.add(fn);
  }

  static async open(sql: SqlDb): Promise<HostStore> {
    await sql.migrate('hosts', HOST_MIGRATIONS);
    return new HostStore(sql);
  }

  async register(h: { id: string; displayUrl: string | null; vcpus: number; ramMiB: number; maxDesktops: number; accel: string; heartbeatSec: number }): Promise<void> {
    const at = now();
    await this.sql.run(`INSERT INTO hosts (id, display_url, vcpus, ram_mib, max_desktops, accel, heartbeat_sec, registered_at, last_seen) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
      ON CONFLICT(id) DO UPDATE SET display_url = excluded.display_url, vcpus = excluded.vcpus, ram_mib = excluded.ram_mib, max_desktops = excluded.max_desktops,
        accel = excluded.accel, heartbeat_sec = excluded.heartbeat_sec, last_seen = excluded.last_seen, health = 'ok'`,
    [h.id, h.displayUrl, h.vcpus, h.ramMiB, h.maxDesktops, h.accel, h.heartbeatSec, at, at]);
  }
  async host(id: string): Promise<HostRow | null> {
    const r = await this.sql.get<Raw>('SELECT * FROM hosts WHERE id = ?', [id]);
    return r ? hostRow(r) : null;
  }
  async hosts(): Promise<HostRow[]> {
    return (await this.sql.all<Raw>('SELECT * FROM hosts ORDER BY id')).map(hostRow);
  }
  /** A heartbeat: last seen now, healthy again; false when the host never registered. */
  async heartbeat(id: string, report: HostReport): Promise<boolean> {
    return (await this.sql.run("UPDATE hosts SET last_seen = ?, health = 'ok', report = ? WHERE id = ?", [now(), JSON.stringify(report), id])) === 1;
  }
  /** A host stopping cleanly: not lost, and given no desktop until it registers again. */
  async retire(id: string): Promise<boolean> {
    return (await this.sql.run("UPDATE hosts SET health = 'retired', last_seen = ? WHERE id = ?", [now(), id])) === 1;
  }
  /** Marks lost the healthy hosts silent for three of their heartbeats; returns them (each once). */
  async markLost(at: Date): Promise<HostRow[]> {
    const lost: HostRow[] = [];
    for (const h of await this.hosts()) {
      if (h.health !== 'ok' || at.getTime() - Date.parse(h.lastSeen) <= 3 * h.heartbeatSec * 1000) continue;
      // Compare-and-set on last_seen: a heartbeat that came in meanwhile wins.
      if ((await this.sql.run("UPDATE hosts SET health = 'lost' WHERE id = ? AND last_seen = ? AND health = 'ok'", [h.id, h.lastSeen])) === 1) lost.push(h);
    }
    return lost;
  }

  async placement(desktopId: string): Promise<PlacementRow | null> {
    const r = await this.sql.get<Raw>('SELECT * FROM host_placements WHERE desktop_id = ?', [desktopId]);
    return r ? placementRow(r) : null;
  }
  async placements(hostId?: string): Promise<PlacementRow[]> {
    const rows = hostId ? await this.sql.all<Raw>('SELECT * FROM host_placements WHERE host_id = ? ORDER BY since', [hostId]) : await this.sql.all<Raw>('SELECT * FROM host_placements ORDER BY since');
    return rows.map(placementRow);
  }
  /** The desktop's placement, made only if it has none (the primary key decides races); false otherwise. */
  async place(p: { desktopId: string; hostId: string; snapshotId: string | null; vcpus: number; ramMiB: number }): Promise<boolean> {
    const at = now();
    return (await this.sql.run(`INSERT INTO host_placements (desktop_id, host_id, state, snapshot_id, vcpus, ram_mib, since, updated_at) VALUES (?, ?, 'starting', ?, ?, ?, ?, ?)
      ON CONFLICT (desktop_id) DO NOTHING`, [p.desktopId, p.hostId, p.snapshotId, p.vcpus, p.ramMiB, at, at])) === 1;
  }
  /** Compare-and-set on state: false when another request moved it first. */
  async transition(desktopId: string, from: readonly PlacementState[], to: PlacementState, patch: { detail?: string | null; jobId?: string | null; snapshotId?: string | null } = {}): Promise<boolean> {
    const cur = await this.placement(desktopId);
    if (!cur || !from.includes(cur.state)) return false;
    return (await this.sql.run('UPDATE host_placements SET state = ?, detail = ?, job_id = ?, snapshot_id = ?, updated_at = ? WHERE desktop_id = ? AND state = ? AND updated_at = ?', [
      to, patch.detail === undefined ? cur.detail : patch.detail, patch.jobId === undefined ? cur.jobId : patch.jobId,
      patch.snapshotId === undefined ? cur.snapshotId : patch.snapshotId, now(), desktopId, cur.state, cur.updatedAt])) === 1;
  }
  /**
   * A host replica's job ends on a placement still running on that host with that job: its snapshot
   * (null: abandoned) becomes the placement's, and a committed one is recorded by job in the same
   * transaction (what a host that lost the answer is told).
   */
  async endReplica(desktopId: string, hostId: string, jobId: string, snapshotId: string | null): Promise<boolean> {
    const set = snapshotId === null ? 'job_id = NULL' : 'job_id = NULL, snapshot_id = ?';
    return await this.sql.transaction(async (c) => {
      const ended = (await c.run(`UPDATE host_placements SET ${set}, updated_at = ? WHERE desktop_id = ? AND host_id = ? AND state = 'running' AND job_id = ?`, [
        ...(snapshotId === null ? [] : [snapshotId]), now(), desktopId, hostId, jobId])) === 1;
      if (ended && snapshotId !== null) {
        await c.run('INSERT INTO host_replica_commits (job_id, desktop_id, host_id, snapshot_id, committed_at) VALUES (?, ?, ?, ?, ?)', [jobId, desktopId, hostId, snapshotId, now()]);
        // A host asks again at its next contact, not weeks later.
        await c.run('DELETE FROM host_replica_commits WHERE desktop_id = ? AND committed_at < ?', [desktopId, new Date(Date.now() - 30 * 86400_000).toISOString()]);
      }
      return ended;
    });
  }
  /** The snapshot a replica job committed, if it did. */
  async replicaCommitted(jobId: string): Promise<{ desktopId: string; hostId: string; snapshotId: string } | null> {
    const r = await this.sql.get<Raw>('SELECT * FROM host_replica_commits WHERE job_id = ?', [jobId]);
    return r ? { desktopId: String(r.desktop_id), hostId: String(r.host_id), snapshotId: String(r.snapshot_id) } : null;
  }

  /** A host's credential hash; false when the host already has one (revoke it first). */
  async addKey(hostId: string, hash: string, by: string): Promise<boolean> {
    return (await this.sql.run('INSERT INTO host_keys (host_id, hash, made_at, made_by) VALUES (?, ?, ?, ?) ON CONFLICT (host_id) DO NOTHING', [hostId, hash, now(), by])) === 1;
  }
  async keyHash(hostId: string): Promise<string | null> {
    return str((await this.sql.get<Raw>('SELECT hash FROM host_keys WHERE host_id = ?', [hostId]))?.hash);
  }
  async revokeKey(hostId: string): Promise<boolean> {
    return (await this.sql.run('DELETE FROM host_keys WHERE host_id = ?', [hostId])) === 1;
  }
  async keys(): Promise<{ hostId: string; madeAt: string; madeBy: string }[]> {
    return (await this.sql.all<Raw>('SELECT host_id, made_at, made_by FROM host_keys ORDER BY host_id')).map((r) => ({ hostId: String(r.host_id), madeAt: String(r.made_at), madeBy: String(r.made_by) }));
  }
  /** A revoked host: lost now (its desktops are marked by the caller), whatever it was; null when it never registered. */
  async markCutOff(id: string): Promise<HostRow | null> {
    const h = await this.host(id);
    if (!h) return null;
    await this.sql.run("UPDATE hosts SET health = 'lost' WHERE id = ?", [id]);
    return h;
  }
  /** Ends a placement that is in one of `from` (release, or a start that left nothing on the host). */
  async unplace(desktopId: string, from: readonly PlacementState[]): Promise<boolean> {
    return (await this.sql.run(`DELETE FROM host_placements WHERE desktop_id = ? AND state IN (${from.map(() => '?').join(', ')})`, [desktopId, ...from])) === 1;
  }

  async queue(c: { hostId: string; desktopId: string; type: HostCommandType }): Promise<string> {
    const id = randomUUID();
    await this.sql.run('INSERT INTO host_commands (id, host_id, desktop_id, type, created_at) VALUES (?, ?, ?, ?, ?)', [id, c.hostId, c.desktopId, c.type, now()]);
    for (const fn of this.queued) fn(c.hostId);
    return id;
  }
  async pending(hostId: string): Promise<HostCommandRow[]> {
    return (await this.sql.all<Raw>("SELECT * FROM host_commands WHERE host_id = ? AND state = 'pending' ORDER BY created_at, id", [hostId])).map(commandRow);
  }
  async command(id: string): Promise<HostCommandRow | null> {
    const r = await this.sql.get<Raw>('SELECT * FROM host_commands WHERE id = ?', [id]);
    return r ? commandRow(r) : null;
  }
  /** Once: false when already acknowledged, or not this host's. */
  async ack(id: string, hostId: string, ok: boolean, result: string | null): Promise<boolean> {
    return (await this.sql.run("UPDATE host_commands SET state = ?, result = ?, acked_at = ? WHERE id = ? AND host_id = ? AND state = 'pending'", [ok ? 'done' : 'failed', result, now(), id, hostId])) === 1;
  }

  /** Every command of `type`, any host, any state (the admin's and the tests' view). */
  async commandsOfType(type: HostCommandType): Promise<HostCommandRow[]> {
    return (await this.sql.all<Raw>('SELECT * FROM host_commands WHERE type = ? ORDER BY created_at, id', [type])).map(commandRow);
  }

  async addHandover(h: { checkoutId: string; desktopId: string; hostId: string; baseSnapshot: string; was: 'running' | 'stopped'; prefetchJobId: string | null }): Promise<void> {
    const at = now();
    await this.sql.run("INSERT INTO host_handovers (checkout_id, desktop_id, host_id, base_snapshot, was, step, prefetch_job_id, created_at, updated_at) VALUES (?, ?, ?, ?, ?, 'asked', ?, ?, ?)",
      [h.checkoutId, h.desktopId, h.hostId, h.baseSnapshot, h.was, h.prefetchJobId, at, at]);
  }
  async handover(checkoutId: string): Promise<HandoverRow | null> {
    const r = await this.sql.get<Raw>('SELECT * FROM host_handovers WHERE checkout_id = ?', [checkoutId]);
    return r ? handoverRow(r) : null;
  }
  /** The newest handover of a desktop (at most one is open: the check-out lock allows one check-out at a time). */
  async handoverOf(desktopId: string): Promise<HandoverRow | null> {
    const r = await this.sql.get<Raw>('SELECT * FROM host_handovers WHERE desktop_id = ? ORDER BY created_at DESC, checkout_id DESC LIMIT 1', [desktopId]);
    return r ? handoverRow(r) : null;
  }
  /** Compare-and-set on the step: false when it moved meanwhile. */
  async handoverStep(checkoutId: string, from: readonly HandoverStep[], to: HandoverStep, patch: { detail?: string | null; jobId?: string | null } = {}): Promise<boolean> {
    const cur = await this.handover(checkoutId);
    if (!cur || !from.includes(cur.step)) return false;
    const moved = (await this.sql.run('UPDATE host_handovers SET step = ?, detail = ?, job_id = ?, updated_at = ? WHERE checkout_id = ? AND step = ?', [
      to, patch.detail === undefined ? cur.detail : patch.detail, patch.jobId === undefined ? cur.jobId : patch.jobId, now(), checkoutId, cur.step])) === 1;
    if (moved) this.wakeHandover(checkoutId);
    return moved;
  }

  async keep(k: { desktopId: string; hostId: string; snapshotId: string | null; reason: string | null }): Promise<void> {
    await this.sql.run('INSERT INTO host_kept (desktop_id, host_id, snapshot_id, since, reason) VALUES (?, ?, ?, ?, ?) ON CONFLICT (desktop_id, host_id) DO NOTHING', [k.desktopId, k.hostId, k.snapshotId, now(), k.reason]);
  }
  /** The at-risk copies: of one desktop, or on one host. */
  async kept(by: { desktopId?: string; hostId?: string }): Promise<KeptRow[]> {
    const rows = by.desktopId ? await this.sql.all<Raw>('SELECT * FROM host_kept WHERE desktop_id = ? ORDER BY since', [by.desktopId]) : await this.sql.all<Raw>('SELECT * FROM host_kept WHERE host_id = ? ORDER BY since', [by.hostId ?? '']);
    return rows.map((r) => ({ desktopId: String(r.desktop_id), hostId: String(r.host_id), snapshotId: str(r.snapshot_id), since: String(r.since), reason: str(r.reason) }));
  }
  async unkeep(desktopId: string, hostId: string): Promise<boolean> {
    return (await this.sql.run('DELETE FROM host_kept WHERE desktop_id = ? AND host_id = ?', [desktopId, hostId])) === 1;
  }

  async addDisplayTicket(t: { hash: string; user: string; desktopId: string; expiresAt: string }): Promise<void> {
    await this.sql.run('INSERT INTO display_tickets (hash, user_name, desktop_id, expires_at, created_at) VALUES (?, ?, ?, ?, ?)', [t.hash, t.user, t.desktopId, t.expiresAt, now()]);
  }
  /** Marks the ticket used, once (one statement: two connections racing with it, one wins); null when unknown or already used. */
  async consumeDisplayTicket(hash: string): Promise<{ user: string; desktopId: string; expiresAt: string } | null> {
    if ((await this.sql.run('UPDATE display_tickets SET used_at = ? WHERE hash = ? AND used_at IS NULL', [now(), hash])) !== 1) return null;
    const r = (await this.sql.get<Raw>('SELECT * FROM display_tickets WHERE hash = ?', [hash]))!;
    return { user: String(r.user_name), desktopId: String(r.desktop_id), expiresAt: String(r.expires_at) };
  }
  /** Whether a ticket with this hash was ever issued (to tell "used" from "unknown"). */
  async displayTicketKnown(hash: string): Promise<boolean> {
    return Boolean(await this.sql.get<Raw>('SELECT hash FROM display_tickets WHERE hash = ?', [hash]));
  }
  /** Tickets past their time go (used or not): they can never open anything. */
  async pruneDisplayTickets(before: Date): Promise<void> {
    await this.sql.run('DELETE FROM display_tickets WHERE expires_at < ?', [before.toISOString()]);
  }
}
