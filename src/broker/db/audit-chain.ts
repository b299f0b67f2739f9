import { createHash, createHmac, hkdfSync } from 'node:crypto';
import type { SqlConn } from '../../sql/driver.js';

/**
 * The audit trail as a keyed hash chain: each event's hash is an HMAC, under a key derived from
 * the broker's master key, of the previous event's hash and every field of the event. Editing,
 * deleting or reordering any event breaks every later link, and whoever can write the database
 * but lacks the master key cannot recompute the links. (Truncating the newest events is caught by
 * comparing the head with one recorded elsewhere: `carryon admin audit verify` prints it.)
 * Databases from before keying keep their plain SHA-256 links; the first keyed event covers the
 * last of them, so that prefix cannot be rewritten either, and an unkeyed event after a keyed one
 * (or an unkeyed head) is a break. Appends take the `audit` lock, so brokers sharing one
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
  /** HMAC under the chain key (false: a plain SHA-256 link from before keying). */
  keyed: boolean;
}

type Raw = Record<string, unknown>;

/** The chain's HMAC key: derived from the master key, for this use only. */
export function auditChainKey(masterKey: Buffer): Buffer {
  return Buffer.from(hkdfSync('sha256', masterKey, Buffer.alloc(0), 'carryon audit chain v1', 32));
}

type EventFields = Omit<ChainedEvent, 'prevHash' | 'hash' | 'keyed'>;

/** The link of one event: HMAC under `key`, or (events from before keying only) plain SHA-256. */
export function eventHash(prevHash: string, e: EventFields, key: Buffer | null): string {
  const canonical = JSON.stringify([e.id, e.time, e.actor, e.desktopId, e.action, e.outcome, e.detail]);
  const h = key ? createHmac('sha256', key) : createHash('sha256');
  return h.update(prevHash).update('\n').update(canonical).digest('hex');
}

function row(r: Raw): ChainedEvent {
  return {
    id: Number(r.id), time: String(r.time), actor: String(r.actor), desktopId: (r.desktop_id as string | null) ?? null, action: String(r.action),
    outcome: String(r.outcome), detail: (r.detail as string | null) ?? null, prevHash: String(r.prev_hash ?? ''), hash: String(r.hash ?? ''),
    keyed: Number(r.keyed ?? 0) === 1,
  };
}

interface NewEvent { actor: string; desktopId?: string | null; action: string; outcome: string; detail?: string | null }

/** Inside the chain's lock: one keyed event after the newest. */
async function link(c: SqlConn, key: Buffer, e: NewEvent, time: string): Promise<number> {
  const last = await c.get('SELECT hash FROM events ORDER BY id DESC LIMIT 1');
  const prevHash = last ? String(last.hash ?? GENESIS) : GENESIS;
  const ins = await c.get('INSERT INTO events (time, actor, desktop_id, action, outcome, detail, prev_hash, keyed) VALUES (?, ?, ?, ?, ?, ?, ?, 1) RETURNING id',
    [time, e.actor, e.desktopId ?? null, e.action, e.outcome, e.detail ?? null, prevHash]);
  const id = Number(ins!.id);
  const hash = eventHash(prevHash, { id, time, actor: e.actor, desktopId: e.desktopId ?? null, action: e.action, outcome: e.outcome, detail: e.detail ?? null }, key);
  await c.run('UPDATE events SET hash = ? WHERE id = ?', [hash, id]);
  return id;
}

/** Appends one event, linked to the newest one, in one transaction. */
export function appendEvent(sql: SqlConn, key: Buffer, e: NewEvent, time = new Date().toISOString()): Promise<number> {
  return sql.transaction((c) => link(c, key, e, time), LOCK);
}

/**
 * At open, never silently. Events without a hash exist legitimately only in a database from
 * before the chain (every append hashes in its own transaction): they are chained only while the
 * trail holds no keyed link yet, only when they are the newest, and an event says so. Anywhere
 * else they were written behind the brokers' back and are left for `verify` to report. A chain
 * whose head is not keyed (a database from before keying) gets a keyed event saying that keying
 * starts there.
 */
export function sealChainAtOpen(sql: SqlConn, key: Buffer, by: string): Promise<{ chained: number; keyingStarted: boolean }> {
  return sql.transaction(async (c) => {
    const keyedBefore = (await c.get('SELECT id FROM events WHERE keyed = 1 LIMIT 1')) !== undefined;
    const newestHashed = Number((await c.get('SELECT MAX(id) AS id FROM events WHERE hash IS NOT NULL'))?.id ?? 0);
    const rows = keyedBefore ? [] : await c.all('SELECT * FROM events WHERE hash IS NULL AND id > ? ORDER BY id', [newestHashed]);
    for (const r of rows) {
      const prev = await c.get('SELECT hash FROM events WHERE id < ? ORDER BY id DESC LIMIT 1', [Number(r.id)]);
      const prevHash = prev ? String(prev.hash) : GENESIS;
      const e = row(r);
      await c.run('UPDATE events SET prev_hash = ?, hash = ?, keyed = 1 WHERE id = ?', [prevHash, eventHash(prevHash, e, key), e.id]);
    }
    if (rows.length > 0) {
      const ids = `${String(rows[0]!.id)}–${String(rows[rows.length - 1]!.id)}`;
      await link(c, key, { actor: by, action: 'audit-chain-repair', outcome: 'warning', detail: `${rows.length} event(s) (ids ${ids}) had no hash at open: chained now. They were written without a broker's chain (a database from before it, or rows inserted behind the broker's back)` }, new Date().toISOString());
    }
    const head = await c.get('SELECT keyed FROM events ORDER BY id DESC LIMIT 1');
    const keyingStarted = head !== undefined && Number(head.keyed ?? 0) !== 1;
    if (keyingStarted) {
      await link(c, key, { actor: by, action: 'audit-chain-keyed', outcome: 'ok', detail: 'the audit chain is keyed (HMAC under a key derived from the master key) from this event on; this event covers the plain SHA-256 links before it' }, new Date().toISOString());
    }
    return { chained: rows.length, keyingStarted };
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
export async function verifyChain(sql: SqlConn, key: Buffer): Promise<ChainCheck> {
  let prevHash = GENESIS;
  let count = 0;
  let after = 0;
  let keyedSeen = false;
  let headKeyed = false;
  for (;;) {
    const rows = (await sql.all('SELECT * FROM events WHERE id > ? ORDER BY id LIMIT 5000', [after])).map(row);
    if (rows.length === 0) break;
    for (const e of rows) {
      const broken = (reason: string): ChainCheck => ({ ok: false, events: count, head: prevHash, brokenAt: e.id, reason });
      if (e.prevHash !== prevHash) return broken('link to the previous event does not match (an event was removed or reordered)');
      if (keyedSeen && !e.keyed) return broken('an unkeyed event after keying began (written without the chain key)');
      if (eventHash(prevHash, e, e.keyed ? key : null) !== e.hash) return broken('event content does not match its hash (it was edited)');
      keyedSeen ||= e.keyed;
      headKeyed = e.keyed;
      prevHash = e.hash;
      count++;
      after = e.id;
    }
  }
  // An unkeyed head: every link could have been recomputed by anyone (the broker keys the head at open).
  if (count > 0 && !headKeyed) return { ok: false, events: count, head: prevHash, brokenAt: after, reason: 'the newest event is not keyed: the chain may have been rewritten without the chain key' };
  return { ok: true, events: count, head: prevHash };
}

/** Events after `sinceId`, oldest first, with their links: one JSON object per line. */
export async function exportEvents(sql: SqlConn, sinceId = 0, limit = 100_000): Promise<string> {
  const rows = (await sql.all('SELECT * FROM events WHERE id > ? ORDER BY id LIMIT ?', [sinceId, limit])).map(row);
  return rows.map((e) => JSON.stringify(e)).join('\n') + (rows.length ? '\n' : '');
}
