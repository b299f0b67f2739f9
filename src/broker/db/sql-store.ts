import { randomUUID } from 'node:crypto';
import { appendEvent, exportEvents, verifyChain, type ChainCheck } from './audit-chain.js';
import type { SqlConn } from '../../sql/driver.js';
import * as rows from './rows.js';
import type { Raw } from './rows.js';
import type {
  CheckoutPatch, CheckoutRow, CheckoutState, CommandRow, DesktopConfig, DesktopRow, DeviceRow, Entitlement, EventFilter, EventRow, MetadataStore, NewEvent,
  Policy, PoolRow, SnapshotDisk, SnapshotRow, UserRow,
} from './types.js';

const now = () => new Date().toISOString();
const json = (v: unknown) => JSON.stringify(v);
const ACTIVE = `('transferring','checked_out','checking_in')`;

/**
 * The metadata store over either engine: portable SQL through a `SqlConn` (SQLite or
 * PostgreSQL), the few dialect differences spelt out where they occur.
 */
export class SqlMetadataStore implements MetadataStore {
  constructor(
    protected readonly sql: SqlConn,
    /** Keys the audit chain's links (audit-chain.ts). */
    private readonly auditKey: Buffer,
  ) {}

  transaction<T>(fn: (tx: MetadataStore) => Promise<T>): Promise<T> {
    return this.sql.transaction((c) => fn(new SqlMetadataStore(c, this.auditKey)));
  }

  private async one(sql: string, params: readonly (string | number | Buffer | null)[]): Promise<Raw | undefined> {
    return this.sql.get<Raw>(sql, params);
  }

  async getSetting(key: string): Promise<string | null> {
    const r = await this.one('SELECT value FROM settings WHERE key = ?', [key]);
    return r ? String(r.value) : null;
  }
  async setSetting(key: string, value: string): Promise<void> {
    await this.sql.run('INSERT INTO settings (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value', [key, value]);
  }

  // Users and groups
  async createUser(u: { name: string; passwordHash: string | null; role: 'admin' | 'user'; source?: string }): Promise<void> {
    await this.sql.run('INSERT INTO users (name, password_hash, role, source, created_at) VALUES (?, ?, ?, ?, ?)', [u.name, u.passwordHash, u.role, u.source ?? 'local', now()]);
  }
  async getUser(name: string): Promise<UserRow | null> {
    const r = await this.one('SELECT * FROM users WHERE name = ?', [name]);
    return r ? rows.userRow(r) : null;
  }
  async listUsers(): Promise<UserRow[]> {
    return (await this.sql.all<Raw>('SELECT * FROM users ORDER BY name')).map(rows.userRow);
  }
  async updateUser(name: string, patch: { passwordHash?: string; role?: 'admin' | 'user'; disabled?: boolean; policy?: Policy }): Promise<boolean> {
    return this.transaction(async (tx) => {
      const cur = await tx.getUser(name);
      if (!cur) return false;
      await (tx as SqlMetadataStore).sql.run('UPDATE users SET password_hash = ?, role = ?, disabled = ?, policy = ? WHERE name = ?', [
        patch.passwordHash ?? cur.passwordHash, patch.role ?? cur.role, (patch.disabled ?? cur.disabled) ? 1 : 0, json(patch.policy ?? cur.policy), name]);
      return true;
    });
  }
  async deleteUser(name: string): Promise<boolean> {
    return (await this.sql.run('DELETE FROM users WHERE name = ?', [name])) > 0;
  }
  async createGroup(name: string): Promise<void> {
    await this.sql.run('INSERT INTO groups (name, created_at) VALUES (?, ?)', [name, now()]);
  }
  async listGroups(): Promise<{ name: string; members: string[] }[]> {
    const groups = await this.sql.all<Raw>('SELECT name FROM groups ORDER BY name');
    const members = await this.sql.all<Raw>('SELECT group_name, user_name FROM group_members ORDER BY user_name');
    return groups.map((g) => ({ name: String(g.name), members: members.filter((m) => m.group_name === g.name).map((m) => String(m.user_name)) }));
  }
  async addGroupMember(group: string, user: string): Promise<void> {
    await this.sql.run('INSERT INTO group_members (group_name, user_name) VALUES (?, ?) ON CONFLICT DO NOTHING', [group, user]);
  }
  async removeGroupMember(group: string, user: string): Promise<boolean> {
    return (await this.sql.run('DELETE FROM group_members WHERE group_name = ? AND user_name = ?', [group, user])) > 0;
  }
  async groupsOf(user: string): Promise<string[]> {
    return (await this.sql.all<Raw>('SELECT group_name FROM group_members WHERE user_name = ? ORDER BY group_name', [user])).map((r) => String(r.group_name));
  }
  async deleteGroup(name: string): Promise<boolean> {
    return this.sql.transaction(async (c) => {
      await c.run("DELETE FROM entitlements WHERE principal_type = 'group' AND principal = ?", [name]);
      await c.run('DELETE FROM group_members WHERE group_name = ?', [name]);
      return (await c.run('DELETE FROM groups WHERE name = ?', [name])) > 0;
    });
  }

  // Pools, lineages, desktops, snapshots
  async createPool(name: string, policy: Policy = {}): Promise<string> {
    const id = randomUUID();
    await this.sql.run('INSERT INTO pools (id, name, policy, created_at) VALUES (?, ?, ?, ?)', [id, name, json(policy), now()]);
    return id;
  }
  async getPool(idOrName: string): Promise<PoolRow | null> {
    const r = await this.one('SELECT * FROM pools WHERE id = ? OR name = ?', [idOrName, idOrName]);
    return r ? rows.poolRow(r) : null;
  }
  async listPools(): Promise<PoolRow[]> {
    return (await this.sql.all<Raw>('SELECT * FROM pools ORDER BY name')).map(rows.poolRow);
  }
  async setPoolPolicy(id: string, policy: Policy): Promise<void> {
    await this.sql.run('UPDATE pools SET policy = ? WHERE id = ?', [json(policy), id]);
  }
  async deletePool(id: string): Promise<boolean> {
    return this.sql.transaction(async (c) => {
      await c.run("DELETE FROM entitlements WHERE target_type = 'pool' AND target = ?", [id]);
      return (await c.run('DELETE FROM pools WHERE id = ?', [id])) > 0;
    });
  }
  async createLineage(wrappedKeys: Buffer, id: string = randomUUID()): Promise<string> {
    await this.sql.run('INSERT INTO lineages (id, wrapped_keys, created_at) VALUES (?, ?, ?)', [id, wrappedKeys, now()]);
    return id;
  }
  async setLineageKeys(id: string, wrappedKeys: Buffer): Promise<void> {
    await this.sql.run('UPDATE lineages SET wrapped_keys = ? WHERE id = ?', [wrappedKeys, id]);
  }
  async getLineageKeys(id: string): Promise<Buffer | null> {
    const r = await this.one('SELECT wrapped_keys FROM lineages WHERE id = ?', [id]);
    return r ? Buffer.from(r.wrapped_keys as Uint8Array) : null;
  }
  async createDesktop(d: { id?: string; name: string; poolId: string | null; lineageId: string; config: DesktopConfig }): Promise<string> {
    const id = d.id ?? randomUUID();
    await this.sql.run('INSERT INTO desktops (id, name, pool_id, lineage_id, config, created_at) VALUES (?, ?, ?, ?, ?, ?)', [id, d.name, d.poolId, d.lineageId, json(d.config), now()]);
    return id;
  }
  async getDesktop(idOrName: string): Promise<DesktopRow | null> {
    const r = await this.one('SELECT * FROM desktops WHERE id = ? OR name = ?', [idOrName, idOrName]);
    return r ? rows.desktopRow(r) : null;
  }
  async listDesktops(): Promise<DesktopRow[]> {
    return (await this.sql.all<Raw>('SELECT * FROM desktops ORDER BY name')).map(rows.desktopRow);
  }
  async setDesktopPolicy(id: string, policy: Policy): Promise<void> {
    await this.sql.run('UPDATE desktops SET policy = ? WHERE id = ?', [json(policy), id]);
  }
  async setDesktopSnapshot(id: string, snapshotId: string): Promise<void> {
    await this.sql.run('UPDATE desktops SET current_snapshot = ? WHERE id = ?', [snapshotId, id]);
  }
  async setPowerState(id: string, state: string): Promise<void> {
    await this.sql.run('UPDATE desktops SET power_state = ? WHERE id = ?', [state, id]);
  }
  async deleteDesktop(id: string): Promise<void> {
    await this.sql.transaction(async (c) => {
      await c.run("DELETE FROM entitlements WHERE target_type = 'desktop' AND target = ?", [id]);
      await c.run('DELETE FROM checkouts WHERE desktop_id = ?', [id]);
      await c.run('DELETE FROM desktops WHERE id = ?', [id]);
    });
  }
  async createSnapshot(s: { desktopId: string; parentId: string | null; kind: string; disks: SnapshotDisk[] }): Promise<string> {
    const id = randomUUID();
    await this.sql.run('INSERT INTO snapshots (id, desktop_id, parent_id, kind, disks, created_at) VALUES (?, ?, ?, ?, ?, ?)', [id, s.desktopId, s.parentId, s.kind, json(s.disks), now()]);
    return id;
  }
  async getSnapshot(id: string): Promise<SnapshotRow | null> {
    const r = await this.one('SELECT * FROM snapshots WHERE id = ?', [id]);
    return r ? rows.snapshotRow(r) : null;
  }
  async listSnapshots(desktopId: string): Promise<SnapshotRow[]> {
    // Creation order: SQLite's rowid, PostgreSQL's seq column.
    const order = this.sql.dialect === 'sqlite' ? 'rowid' : 'seq';
    return (await this.sql.all<Raw>(`SELECT * FROM snapshots WHERE desktop_id = ? ORDER BY created_at, ${order}`, [desktopId])).map(rows.snapshotRow);
  }
  async deleteSnapshots(ids: readonly string[]): Promise<string[]> {
    return this.sql.transaction(async (c) => {
      const out: string[] = [];
      for (const id of ids) {
        const n = await c.run(`DELETE FROM snapshots WHERE id = ?
          AND id NOT IN (SELECT current_snapshot FROM desktops WHERE current_snapshot IS NOT NULL)
          AND id NOT IN (SELECT checkpoint_snapshot FROM checkouts WHERE state IN ${ACTIVE})`, [id]);
        if (n === 1) out.push(id);
      }
      return out;
    });
  }

  // Entitlements
  async addEntitlement(e: Omit<Entitlement, 'id'>): Promise<string> {
    const id = randomUUID();
    await this.sql.run('INSERT INTO entitlements (id, principal_type, principal, target_type, target) VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING', [id, e.principalType, e.principal, e.targetType, e.target]);
    return id;
  }
  async removeEntitlement(id: string): Promise<boolean> {
    return (await this.sql.run('DELETE FROM entitlements WHERE id = ?', [id])) > 0;
  }
  async listEntitlements(): Promise<Entitlement[]> {
    return (await this.sql.all<Raw>('SELECT * FROM entitlements ORDER BY principal, target')).map(rows.entitlementRow);
  }
  async isEntitled(user: string, desktop: DesktopRow): Promise<boolean> {
    const groups = await this.groupsOf(user);
    return (await this.listEntitlements()).some(
      (e) =>
        ((e.principalType === 'user' && e.principal === user) || (e.principalType === 'group' && groups.includes(e.principal))) &&
        ((e.targetType === 'desktop' && e.target === desktop.id) || (e.targetType === 'pool' && e.target === desktop.poolId)),
    );
  }

  // Devices
  async createDevice(d: { user: string; name: string; publicKey: string; host: Record<string, unknown> }): Promise<string> {
    const id = randomUUID();
    await this.sql.run('INSERT INTO devices (id, user_name, name, public_key, host, enrolled_at) VALUES (?, ?, ?, ?, ?, ?)', [id, d.user, d.name, d.publicKey, json(d.host), now()]);
    return id;
  }
  async getDevice(id: string): Promise<DeviceRow | null> {
    const r = await this.one('SELECT * FROM devices WHERE id = ?', [id]);
    return r ? rows.deviceRow(r) : null;
  }
  async listDevices(): Promise<DeviceRow[]> {
    return (await this.sql.all<Raw>('SELECT * FROM devices ORDER BY enrolled_at')).map(rows.deviceRow);
  }
  async touchDevice(id: string, host?: Record<string, unknown>): Promise<void> {
    if (host) await this.sql.run('UPDATE devices SET last_seen = ?, host = ? WHERE id = ?', [now(), json(host), id]);
    else await this.sql.run('UPDATE devices SET last_seen = ? WHERE id = ?', [now(), id]);
  }
  async addHeartbeat(deviceId: string, stats: unknown): Promise<void> {
    await this.sql.run('INSERT INTO heartbeats (device_id, time, stats) VALUES (?, ?, ?)', [deviceId, now(), json(stats)]);
  }
  async latestHeartbeats(deviceId: string, limit: number): Promise<{ time: string; stats: unknown }[]> {
    return (await this.sql.all<Raw>('SELECT time, stats FROM heartbeats WHERE device_id = ? ORDER BY id DESC LIMIT ?', [deviceId, limit])).map((r) => ({ time: String(r.time), stats: rows.parse(r.stats) }));
  }
  async deviceRevokedAt(id: string): Promise<string | null> {
    const r = await this.one('SELECT revoked_at FROM devices WHERE id = ?', [id]);
    return r?.revoked_at ? String(r.revoked_at) : null;
  }
  async revokeDevice(id: string): Promise<boolean> {
    return (await this.sql.run('UPDATE devices SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL', [now(), id])) > 0;
  }
  async acceptNonce(deviceId: string, nonce: string, windowMs: number): Promise<boolean> {
    const t = Date.now();
    // Signatures are accepted for ±window around their time: remember the nonce for twice that.
    if (Math.random() < 0.01) await this.sql.run('DELETE FROM agent_nonces WHERE expires_at <= ?', [t]);
    const n = await this.sql.run(`INSERT INTO agent_nonces (device_id, nonce, expires_at) VALUES (?, ?, ?)
      ON CONFLICT (device_id, nonce) DO UPDATE SET expires_at = excluded.expires_at WHERE agent_nonces.expires_at <= ?`, [deviceId, nonce, t + 2 * windowMs, t]);
    return n === 1;
  }

  async loginBlockedUntil(keys: readonly string[]): Promise<number> {
    if (!keys.length) return 0;
    const rows = await this.sql.all<Raw>(`SELECT blocked_until FROM login_failures WHERE key IN (${keys.map(() => '?').join(', ')})`, [...keys]);
    return Math.max(0, ...rows.map((r) => Number(r.blocked_until)));
  }
  async recordLoginFailure(key: string, at: number, forgetAfterMs: number): Promise<number> {
    // Old keys go now and then, as the nonces do.
    if (Math.random() < 0.01) await this.sql.run('DELETE FROM login_failures WHERE last_failure < ? AND blocked_until <= ?', [at - forgetAfterMs, at]);
    // One atomic upsert: two brokers counting at once never lose a failure.
    const r = await this.sql.get<Raw>(`INSERT INTO login_failures (key, failures, last_failure, blocked_until) VALUES (?, 1, ?, 0)
      ON CONFLICT (key) DO UPDATE SET failures = CASE WHEN login_failures.last_failure < ? THEN 1 ELSE login_failures.failures + 1 END, last_failure = ?
      RETURNING failures`, [key, at, at - forgetAfterMs, at]);
    return Number(r?.failures ?? 1);
  }
  async reserveLoginAttempt(key: string, at: number, forgetAfterMs: number, delays: readonly number[]): Promise<number | null> {
    const count = 'CASE WHEN login_failures.last_failure < ? THEN 1 ELSE login_failures.failures + 1 END';
    // The check, the count and the block in one upsert: attempts racing (on one broker or several)
    // are admitted one at a time, so no more are judged than the backoff allows.
    // A free attempt sets no block (0), not "until now": a racing attempt that read the clock a
    // moment earlier would otherwise find itself blocked by it.
    const until = (d: number) => (d > 0 ? Math.floor(at) + Math.floor(d) : 0);
    const r = await this.sql.get<Raw>(`INSERT INTO login_failures (key, failures, last_failure, blocked_until) VALUES (?, 1, ?, ${until(delays[0] ?? 0)})
      ON CONFLICT (key) DO UPDATE SET failures = ${count}, last_failure = ?, blocked_until = ${delayCase(count, delays.map(until))}
      WHERE login_failures.blocked_until <= ?
      RETURNING failures`, [key, at, at - forgetAfterMs, at, at - forgetAfterMs, at]);
    return r ? Number(r.failures) : null;
  }
  async releaseLoginAttempt(key: string): Promise<void> {
    await this.sql.run('UPDATE login_failures SET failures = failures - 1 WHERE key = ? AND failures > 0', [key]);
  }
  async blockLogin(key: string, until: number): Promise<void> {
    await this.sql.run('UPDATE login_failures SET blocked_until = ? WHERE key = ? AND blocked_until < ?', [until, key, until]);
  }
  async clearLoginFailures(key: string): Promise<void> {
    await this.sql.run('DELETE FROM login_failures WHERE key = ?', [key]);
  }

  // Checkouts (the lock is the partial unique index)
  async insertCheckout(c: { desktopId: string; user: string; deviceId: string; checkpointSnapshot: string; leaseExpiresAt: string }): Promise<string | null> {
    const id = randomUUID();
    const t = now();
    const n = await this.sql.run(`INSERT INTO checkouts (id, desktop_id, user_name, device_id, checkpoint_snapshot, state, lease_expires_at, created_at, updated_at)
      VALUES (?, ?, ?, ?, ?, 'transferring', ?, ?, ?) ON CONFLICT DO NOTHING`, [id, c.desktopId, c.user, c.deviceId, c.checkpointSnapshot, c.leaseExpiresAt, t, t]);
    return n === 1 ? id : null;
  }
  async getCheckout(id: string): Promise<CheckoutRow | null> {
    const r = await this.one('SELECT * FROM checkouts WHERE id = ?', [id]);
    return r ? rows.checkoutRow(r) : null;
  }
  async activeCheckout(desktopId: string): Promise<CheckoutRow | null> {
    const r = await this.one(`SELECT * FROM checkouts WHERE desktop_id = ? AND state IN ${ACTIVE}`, [desktopId]);
    return r ? rows.checkoutRow(r) : null;
  }
  async latestCheckout(desktopId: string): Promise<CheckoutRow | null> {
    const r = await this.one('SELECT * FROM checkouts WHERE desktop_id = ? ORDER BY created_at DESC, id DESC LIMIT 1', [desktopId]);
    return r ? rows.checkoutRow(r) : null;
  }
  async listCheckouts(filter: { activeOnly?: boolean } = {}): Promise<CheckoutRow[]> {
    const sql = filter.activeOnly ? `SELECT * FROM checkouts WHERE state IN ${ACTIVE} ORDER BY created_at` : 'SELECT * FROM checkouts ORDER BY created_at';
    return (await this.sql.all<Raw>(sql)).map(rows.checkoutRow);
  }
  async transitionCheckout(id: string, from: CheckoutState[], to: CheckoutState, patch: CheckoutPatch = {}): Promise<boolean> {
    const cur = await this.getCheckout(id);
    if (!cur || !from.includes(cur.state)) return false;
    const pending = patch.pendingDisks === undefined ? cur.pendingDisks : patch.pendingDisks;
    // Compare-and-set: the UPDATE matches only while the state is still the one read.
    const n = await this.sql.run('UPDATE checkouts SET state = ?, job_id = ?, pending_disks = ?, lease_expires_at = ?, updated_at = ? WHERE id = ? AND state = ?', [
      to, patch.jobId === undefined ? cur.jobId : patch.jobId, pending ? json(pending) : null, patch.leaseExpiresAt ?? cur.leaseExpiresAt, now(), id, cur.state]);
    return n === 1;
  }
  async setCheckoutHeartbeat(id: string): Promise<void> {
    await this.sql.run('UPDATE checkouts SET last_heartbeat = ? WHERE id = ?', [now(), id]);
  }
  /** With endUpload, only while an upload is pending (compare-and-set): false when another commit consumed it. */
  async setCheckoutCheckpoint(id: string, snapshotId: string, opts: { endUpload?: boolean } = {}): Promise<boolean> {
    const sql = opts.endUpload ? 'UPDATE checkouts SET checkpoint_snapshot = ?, pending_disks = NULL, job_id = NULL WHERE id = ? AND pending_disks IS NOT NULL' : 'UPDATE checkouts SET checkpoint_snapshot = ? WHERE id = ?';
    return (await this.sql.run(sql, [snapshotId, id])) === 1;
  }
  async checkoutCutOffAt(id: string): Promise<string | null> {
    const r = await this.one('SELECT cut_off_at FROM checkouts WHERE id = ?', [id]);
    return r?.cut_off_at ? String(r.cut_off_at) : null;
  }
  async setCheckoutCutOff(id: string, at: string | null): Promise<void> {
    await this.sql.run('UPDATE checkouts SET cut_off_at = ? WHERE id = ?', [at, id]);
  }

  // Audit
  addEvent(e: NewEvent): Promise<number> {
    return appendEvent(this.sql, this.auditKey, e); // hash-chained: see audit-chain.ts
  }
  async listEvents(f: { sinceId?: number; desktopId?: string; limit?: number } = {}): Promise<EventRow[]> {
    const byDesktop = f.desktopId !== undefined;
    const sql = `SELECT * FROM events WHERE id > ?${byDesktop ? ' AND desktop_id = ?' : ''} ORDER BY id LIMIT ?`;
    return (await this.sql.all<Raw>(sql, [f.sinceId ?? 0, ...(byDesktop ? [f.desktopId!] : []), f.limit ?? 1000])).map(rows.eventRow);
  }
  async listEventsNewest(f: EventFilter = {}): Promise<EventRow[]> {
    const where: string[] = [];
    const params: (string | number)[] = [];
    const eq = (col: string, v: string | number | undefined, op = '=') => {
      if (v === undefined) return;
      where.push(`${col} ${op} ?`);
      params.push(v);
    };
    eq('id', f.beforeId, '<');
    eq('desktop_id', f.desktopId);
    eq('actor', f.actor);
    eq('action', f.action);
    eq('outcome', f.outcome);
    if (f.text) {
      // SQLite's LIKE ignores ASCII case; PostgreSQL needs ILIKE for the same.
      const like = this.sql.dialect === 'postgres' ? 'ILIKE' : 'LIKE';
      const pattern = `%${f.text.replace(/[%_\\]/g, (c) => `\\${c}`)}%`;
      where.push(`(${['actor', 'action', 'outcome', 'detail'].map((c) => `${c} ${like} ? ESCAPE '\\'`).join(' OR ')})`);
      params.push(pattern, pattern, pattern, pattern);
    }
    const sql = `SELECT * FROM events${where.length ? ` WHERE ${where.join(' AND ')}` : ''} ORDER BY id DESC LIMIT ?`;
    return (await this.sql.all<Raw>(sql, [...params, f.limit ?? 200])).map(rows.eventRow);
  }
  verifyAuditChain(): Promise<ChainCheck> {
    return verifyChain(this.sql, this.auditKey);
  }
  exportEvents(sinceId = 0, limit = 100_000): Promise<string> {
    return exportEvents(this.sql, sinceId, limit);
  }

  // Remote commands
  async queueCommand(c: { deviceId: string; desktopId: string | null; type: string }): Promise<string> {
    const id = randomUUID();
    await this.sql.run('INSERT INTO commands (id, device_id, desktop_id, type, created_at) VALUES (?, ?, ?, ?, ?)', [id, c.deviceId, c.desktopId, c.type, now()]);
    return id;
  }
  async pendingCommands(deviceId: string): Promise<CommandRow[]> {
    return (await this.sql.all<Raw>("SELECT * FROM commands WHERE device_id = ? AND state = 'pending' ORDER BY created_at", [deviceId])).map(rows.commandRow);
  }
  async listCommands(): Promise<CommandRow[]> {
    return (await this.sql.all<Raw>('SELECT * FROM commands ORDER BY created_at')).map(rows.commandRow);
  }
  async ackCommand(id: string, deviceId: string, ok: boolean, message: string | null): Promise<boolean> {
    return (await this.sql.run("UPDATE commands SET state = ?, result = ?, acked_at = ? WHERE id = ? AND device_id = ? AND state = 'pending'", [ok ? 'done' : 'failed', message, now(), id, deviceId])) === 1;
  }
}

/** `delays[count - 1]` as SQL (whole milliseconds, written inline: they are ours, not the caller's). */
function delayCase(count: string, delays: readonly number[]): string {
  const ms = delays.map((d) => Math.max(0, Math.floor(d)));
  const last = ms.length - 1;
  const whens = ms.slice(0, last).map((d, i) => `WHEN ${i + 1} THEN ${d}`);
  // `count` appears exactly once either way: the caller's parameters are counted on it.
  return whens.length ? `CASE ${count} ${whens.join(' ')} ELSE ${ms[last]} END` : `CASE WHEN ${count} > 0 THEN ${ms[0] ?? 0} ELSE 0 END`;
}
