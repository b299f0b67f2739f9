import { createHash } from 'node:crypto';
import type { SqlConn } from './sql/driver.js';

/**
 * The audit trail as a hash chain: each event's hash covers the previous event's hash and every
 * field of the event, so editing, deleting or reordering any event breaks every later link.
 * (Truncating the newest events is caught by comparing the head with one recorded elsewhere:
 * `carryon admin audit verify` prints it.) Appends take the `audit` lock, so brokers sharing one
 * PostgreSQL database never fork the chain.
 */
export const GENESIS = '0'.repeat(64);
const LOCK = 'carryon:audit-chain';

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
export function appendEvent(sql: SqlConn, e: { actor: string; desktopId?: string | null; action: string; outcome: string; detail?: string | null }, time = new Date().toISOString()): Promise<number> {
  return sql.transaction(async (c) => {
    const last = await c.get('SELECT hash FROM events ORDER BY id DESC LIMIT 1');
    const prevHash = last ? String(last.hash ?? GENESIS) : GENESIS;
    const ins = await c.get('INSERT INTO events (time, actor, desktop_id, action, outcome, detail, prev_hash) VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING id',
      [time, e.actor, e.desktopId ?? null, e.action, e.outcome, e.detail ?? null, prevHash]);
    const id = Number(ins!.id);
    const hash = eventHash(prevHash, { id, time, actor: e.actor, desktopId: e.desktopId ?? null, action: e.action, outcome: e.outcome, detail: e.detail ?? null });
    await c.run('UPDATE events SET hash = ? WHERE id = ?', [hash, id]);
    return id;
  }, LOCK);
}

/** Chains events written before the chain existed (once, at start). */
export function chainUnhashed(sql: SqlConn): Promise<number> {
  return sql.transaction(async (c) => {
    const rows = await c.all('SELECT * FROM events WHERE hash IS NULL ORDER BY id');
    for (const r of rows) {
      const prev = await c.get('SELECT hash FROM events WHERE id < ? ORDER BY id DESC LIMIT 1', [Number(r.id)]);
      const prevHash = prev ? String(prev.hash) : GENESIS;
      const e = row({ ...r, prev_hash: prevHash });
      await c.run('UPDATE events SET prev_hash = ?, hash = ? WHERE id = ?', [prevHash, eventHash(prevHash, e), e.id]);
    }
    return rows.length;
  }, LOCK);
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
export async function verifyChain(sql: SqlConn): Promise<ChainCheck> {
  let prevHash = GENESIS;
  let count = 0;
  let after = 0;
  for (;;) {
    const rows = (await sql.all('SELECT * FROM events WHERE id > ? ORDER BY id LIMIT 5000', [after])).map(row);
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
export async function exportEvents(sql: SqlConn, sinceId = 0, limit = 100_000): Promise<string> {
  const rows = (await sql.all('SELECT * FROM events WHERE id > ? ORDER BY id LIMIT ?', [sinceId, limit])).map(row);
  return rows.map((e) => JSON.stringify(e)).join('\n') + (rows.length ? '\n' : '');
}
