import { createHash } from 'node:crypto';
import type { Db } from './sqlite.js';

/**
 * The audit trail as a hash chain: each event's hash covers the previous event's hash and every
 * field of the event, so editing, deleting or reordering any event breaks every later link.
 * (Truncating the newest events is caught by comparing the head with one recorded elsewhere:
 * `carryon admin audit verify` prints it.)
 */
export const GENESIS = '0'.repeat(64);

export interface ChainedEvent {
  id: number;
  time: string;
  actor: string;
  desktopId: string | null;
  action: string;
  outcome: string;
  detail: string | null;
  prevHash: string;
  hash: string;
}

type Raw = Record<string, unknown>;

export function eventHash(prevHash: string, e: Omit<ChainedEvent, 'prevHash' | 'hash'>): string {
  const canonical = JSON.stringify([e.id, e.time, e.actor, e.desktopId, e.action, e.outcome, e.detail]);
  return createHash('sha256').update(prevHash).update('\n').update(canonical).digest('hex');
}

function row(r: Raw): ChainedEvent {
  return {
    id: Number(r.id), time: String(r.time), actor: String(r.actor), desktopId: (r.desktop_id as string | null) ?? null, action: String(r.action),
    outcome: String(r.outcome), detail: (r.detail as string | null) ?? null, prevHash: String(r.prev_hash ?? ''), hash: String(r.hash ?? ''),
  };
}

/** Appends one event, linked to the newest one, in one transaction. */
export function appendEvent(db: Db, e: { actor: string; desktopId?: string | null; action: string; outcome: string; detail?: string | null }, time = new Date().toISOString()): number {
  return db.transaction(() => {
    const last = db.prepare('SELECT hash FROM events ORDER BY id DESC LIMIT 1').get() as Raw | undefined;
    const prevHash = last ? String(last.hash ?? GENESIS) : GENESIS;
    const id = Number(db.prepare('INSERT INTO events (time, actor, desktop_id, action, outcome, detail, prev_hash) VALUES (?, ?, ?, ?, ?, ?, ?)')
      .run(time, e.actor, e.desktopId ?? null, e.action, e.outcome, e.detail ?? null, prevHash).lastInsertRowid);
    const hash = eventHash(prevHash, { id, time, actor: e.actor, desktopId: e.desktopId ?? null, action: e.action, outcome: e.outcome, detail: e.detail ?? null });
    db.prepare('UPDATE events SET hash = ? WHERE id = ?').run(hash, id);
    return id;
  })();
}

/** Chains events written before the chain existed (once, at start). */
export function chainUnhashed(db: Db): number {
  return db.transaction(() => {
    const rows = db.prepare('SELECT * FROM events WHERE hash IS NULL ORDER BY id').all() as Raw[];
    for (const r of rows) {
      const prev = db.prepare('SELECT hash FROM events WHERE id < ? ORDER BY id DESC LIMIT 1').get(Number(r.id)) as Raw | undefined;
      const prevHash = prev ? String(prev.hash) : GENESIS;
      const e = row({ ...r, prev_hash: prevHash });
      db.prepare('UPDATE events SET prev_hash = ?, hash = ? WHERE id = ?').run(prevHash, eventHash(prevHash, e), e.id);
    }
    return rows.length;
  })();
}

export interface ChainCheck {
  ok: boolean;
  events: number;
  head: string;
  /** The first event whose link or content does not verify. */
  brokenAt?: number;
  reason?: string;
}

/** Walks the whole chain (in pages, so a long trail does not sit in memory at once). */
export function verifyChain(db: Db): ChainCheck {
  let prevHash = GENESIS;
  let count = 0;
  let after = 0;
  const page = db.prepare('SELECT * FROM events WHERE id > ? ORDER BY id LIMIT 5000');
  for (;;) {
    const rows = (page.all(after) as Raw[]).map(row);
    if (rows.length === 0) break;
    for (const e of rows) {
      if (e.prevHash !== prevHash) return { ok: false, events: count, head: prevHash, brokenAt: e.id, reason: 'link to the previous event does not match (an event was removed or reordered)' };
      if (eventHash(prevHash, e) !== e.hash) return { ok: false, events: count, head: prevHash, brokenAt: e.id, reason: 'event content does not match its hash (it was edited)' };
      prevHash = e.hash;
      count++;
      after = e.id;
    }
  }
  return { ok: true, events: count, head: prevHash };
}

/** Events after `sinceId`, oldest first, with their links: one JSON object per line. */
export function exportEvents(db: Db, sinceId = 0, limit = 100_000): string {
  const rows = (db.prepare('SELECT * FROM events WHERE id > ? ORDER BY id LIMIT ?').all(sinceId, limit) as Raw[]).map(row);
  return rows.map((e) => JSON.stringify(e)).join('\n') + (rows.length ? '\n' : '');
}
