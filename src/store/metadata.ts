import { randomUUID } from 'node:crypto';
import { appendEvent } from './audit-chain.js';
import type { Db } from './sqlite.js';

/** Rows as the broker sees them (JSON columns already parsed). */
export interface UserRow { name: string; passwordHash: string | null; role: 'admin' | 'user'; source: string; disabled: boolean; policy: Record<string, unknown> }
export interface DesktopRow { id: string; name: string; poolId: string | null; lineageId: string; config: DesktopConfig; policy: Record<string, unknown>; currentSnapshot: string | null; powerState: string; createdAt: string }
export interface DesktopConfig { vcpus: number; ramMiB: number; minRamMiB: number; nic: 'user' | 'none'; usb: boolean; disks: { name: string; sizeBytes: number }[] }
export interface SnapshotDisk { name: string; digest: string; sizeBytes: number; chunkSize: number }
export interface SnapshotRow { id: string; desktopId: string; parentId: string | null; kind: string; disks: SnapshotDisk[]; createdAt: string }
export type CheckoutState = 'transferring' | 'checked_out' | 'checking_in' | 'checked_in' | 'cancelled' | 'rolled_back';
export const ACTIVE_STATES: CheckoutState[] = ['transferring', 'checked_out', 'checking_in'];
export interface CheckoutRow { id: string; desktopId: string; user: string; deviceId: string; checkpointSnapshot: string; state: CheckoutState; leaseExpiresAt: string; jobId: string | null; pendingDisks: SnapshotDisk[] | null; lastHeartbeat: string | null; createdAt: string; updatedAt: string }
export interface DeviceRow { id: string; user: string; name: string; publicKey: string; host: Record<string, unknown>; enrolledAt: string; lastSeen: string | null }
export interface EventRow { id: number; time: string; actor: string; desktopId: string | null; action: string; outcome: string; detail: string | null }
export interface CommandRow { id: string; deviceId: string; desktopId: string | null; type: string; state: string; result: string | null; createdAt: string }
export interface Entitlement { id: string; principalType: 'user' | 'group'; principal: string; targetType: 'desktop' | 'pool'; target: string }

type Raw = Record<string, unknown>;
const now = () => new Date().toISOString();
const json = (v: unknown) => JSON.stringify(v);
const parse = <T>(v: unknown): T => JSON.parse(String(v)) as T;

/**
 * The broker's metadata over SQLite. Domain-shaped methods only, so a PostgreSQL implementation
 * can follow without touching callers. Synchronous: better-sqlite3 is, and it keeps the state
 * machine's check-and-set steps inside one transaction.
 */
export class SqliteMetadataStore {
  constructor(readonly db: Db) {}

  transaction<T>(fn: () => T): T {
    return this.db.transaction(fn)();
  }

  getSetting(key: string): string | null {
    const r = this.db.prepare('SELECT value FROM settings WHERE key = ?').get(key) as Raw | undefined;
    return r ? String(r.value) : null;
  }
  setSetting(key: string, value: string): void {
    this.db.prepare('INSERT INTO settings (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value').run(key, value);
  }

  // Users and groups
  createUser(u: { name: string; passwordHash: string | null; role: 'admin' | 'user'; source?: string }): void {
    this.db.prepare('INSERT INTO users (name, password_hash, role, source, created_at) VALUES (?, ?, ?, ?, ?)').run(u.name, u.passwordHash, u.role, u.source ?? 'local', now());
  }
  getUser(name: string): UserRow | null {
    const r = this.db.prepare('SELECT * FROM users WHERE name = ?').get(name) as Raw | undefined;
    return r ? this.userRow(r) : null;
  }
  listUsers(): UserRow[] {
    return (this.db.prepare('SELECT * FROM users ORDER BY name').all() as Raw[]).map((r) => this.userRow(r));
  }
  updateUser(name: string, patch: { passwordHash?: string; role?: 'admin' | 'user'; disabled?: boolean; policy?: Record<string, unknown> }): boolean {
    const cur = this.getUser(name);
    if (!cur) return false;
    this.db.prepare('UPDATE users SET password_hash = ?, role = ?, disabled = ?, policy = ? WHERE name = ?').run(
      patch.passwordHash ?? cur.passwordHash, patch.role ?? cur.role, (patch.disabled ?? cur.disabled) ? 1 : 0, json(patch.policy ?? cur.policy), name);
    return true;
  }
  deleteUser(name: string): boolean {
    return this.db.prepare('DELETE FROM users WHERE name = ?').run(name).changes > 0;
  }
  private userRow(r: Raw): UserRow {
    return { name: String(r.name), passwordHash: (r.password_hash as string | null) ?? null, role: r.role as UserRow['role'], source: String(r.source), disabled: r.disabled === 1, policy: parse(r.policy) };
  }
  createGroup(name: string): void {
    this.db.prepare('INSERT INTO groups (name, created_at) VALUES (?, ?)').run(name, now());
  }
  listGroups(): { name: string; members: string[] }[] {
    const groups = this.db.prepare('SELECT name FROM groups ORDER BY name').all() as Raw[];
    return groups.map((g) => ({
      name: String(g.name),
      members: (this.db.prepare('SELECT user_name FROM group_members WHERE group_name = ? ORDER BY user_name').all(g.name) as Raw[]).map((m) => String(m.user_name)),
    }));
  }
  addGroupMember(group: string, user: string): void {
    this.db.prepare('INSERT OR IGNORE INTO group_members (group_name, user_name) VALUES (?, ?)').run(group, user);
  }
  groupsOf(user: string): string[] {
    return (this.db.prepare('SELECT group_name FROM group_members WHERE user_name = ? ORDER BY group_name').all(user) as Raw[]).map((r) => String(r.group_name));
  }

  // Pools, lineages, desktops, snapshots
  createPool(name: string, policy: Record<string, unknown> = {}): string {
    const id = randomUUID();
    this.db.prepare('INSERT INTO pools (id, name, policy, created_at) VALUES (?, ?, ?, ?)').run(id, name, json(policy), now());
    return id;
  }
  getPool(idOrName: string): { id: string; name: string; policy: Record<string, unknown> } | null {
    const r = this.db.prepare('SELECT * FROM pools WHERE id = ? OR name = ?').get(idOrName, idOrName) as Raw | undefined;
    return r ? { id: String(r.id), name: String(r.name), policy: parse(r.policy) } : null;
  }
  listPools(): { id: string; name: string; policy: Record<string, unknown> }[] {
    return (this.db.prepare('SELECT * FROM pools ORDER BY name').all() as Raw[]).map((r) => ({ id: String(r.id), name: String(r.name), policy: parse(r.policy) }));
  }
  setPoolPolicy(id: string, policy: Record<string, unknown>): void {
    this.db.prepare('UPDATE pools SET policy = ? WHERE id = ?').run(json(policy), id);
  }
  createLineage(wrappedKeys: Buffer, id: string = randomUUID()): string {
    this.db.prepare('INSERT INTO lineages (id, wrapped_keys, created_at) VALUES (?, ?, ?)').run(id, wrappedKeys, now());
    return id;
  }
  setLineageKeys(id: string, wrappedKeys: Buffer): void {
    this.db.prepare('UPDATE lineages SET wrapped_keys = ? WHERE id = ?').run(wrappedKeys, id);
  }
  getLineageKeys(id: string): Buffer | null {
    const r = this.db.prepare('SELECT wrapped_keys FROM lineages WHERE id = ?').get(id) as Raw | undefined;
    return r ? Buffer.from(r.wrapped_keys as Uint8Array) : null;
  }
  createDesktop(d: { id?: string; name: string; poolId: string | null; lineageId: string; config: DesktopConfig }): string {
    const id = d.id ?? randomUUID();
    this.db.prepare('INSERT INTO desktops (id, name, pool_id, lineage_id, config, created_at) VALUES (?, ?, ?, ?, ?, ?)').run(id, d.name, d.poolId, d.lineageId, json(d.config), now());
    return id;
  }
  getDesktop(idOrName: string): DesktopRow | null {
    const r = this.db.prepare('SELECT * FROM desktops WHERE id = ? OR name = ?').get(idOrName, idOrName) as Raw | undefined;
    return r ? this.desktopRow(r) : null;
  }
  listDesktops(): DesktopRow[] {
    return (this.db.prepare('SELECT * FROM desktops ORDER BY name').all() as Raw[]).map((r) => this.desktopRow(r));
  }
  setDesktopPolicy(id: string, policy: Record<string, unknown>): void {
    this.db.prepare('UPDATE desktops SET policy = ? WHERE id = ?').run(json(policy), id);
  }
  setDesktopSnapshot(id: string, snapshotId: string): void {
    this.db.prepare('UPDATE desktops SET current_snapshot = ? WHERE id = ?').run(snapshotId, id);
  }
  setPowerState(id: string, state: string): void {
    this.db.prepare('UPDATE desktops SET power_state = ? WHERE id = ?').run(state, id);
  }
  deleteDesktop(id: string): void {
    this.transaction(() => {
      this.db.prepare("DELETE FROM entitlements WHERE target_type = 'desktop' AND target = ?").run(id);
      this.db.prepare('DELETE FROM checkouts WHERE desktop_id = ?').run(id);
      this.db.prepare('DELETE FROM desktops WHERE id = ?').run(id);
    });
  }
  private desktopRow(r: Raw): DesktopRow {
    return { id: String(r.id), name: String(r.name), poolId: (r.pool_id as string | null) ?? null, lineageId: String(r.lineage_id), config: parse(r.config), policy: parse(r.policy), currentSnapshot: (r.current_snapshot as string | null) ?? null, powerState: String(r.power_state), createdAt: String(r.created_at) };
  }
  createSnapshot(s: { desktopId: string; parentId: string | null; kind: string; disks: SnapshotDisk[] }): string {
    const id = randomUUID();
    this.db.prepare('INSERT INTO snapshots (id, desktop_id, parent_id, kind, disks, created_at) VALUES (?, ?, ?, ?, ?, ?)').run(id, s.desktopId, s.parentId, s.kind, json(s.disks), now());
    return id;
  }
  getSnapshot(id: string): SnapshotRow | null {
    const r = this.db.prepare('SELECT * FROM snapshots WHERE id = ?').get(id) as Raw | undefined;
    return r ? this.snapshotRow(r) : null;
  }
  listSnapshots(desktopId: string): SnapshotRow[] {
    return (this.db.prepare('SELECT * FROM snapshots WHERE desktop_id = ? ORDER BY created_at, rowid').all(desktopId) as Raw[]).map((r) => this.snapshotRow(r));
  }
  /**
   * Deletes snapshots (garbage collection's retention), never a desktop's current snapshot nor
   * the checkpoint of an active check-out, whatever the caller computed earlier. Returns the
   * ids really deleted.
   */
  deleteSnapshots(ids: readonly string[]): string[] {
    const del = this.db.prepare(`DELETE FROM snapshots WHERE id = ?
      AND id NOT IN (SELECT current_snapshot FROM desktops WHERE current_snapshot IS NOT NULL)
      AND id NOT IN (SELECT checkpoint_snapshot FROM checkouts WHERE state IN ('transferring','checked_out','checking_in'))`);
    return this.transaction(() => ids.filter((id) => del.run(id).changes === 1));
  }
  private snapshotRow(r: Raw): SnapshotRow {
    return { id: String(r.id), desktopId: String(r.desktop_id), parentId: (r.parent_id as string | null) ?? null, kind: String(r.kind), disks: parse(r.disks), createdAt: String(r.created_at) };
  }

  // Entitlements
  addEntitlement(e: Omit<Entitlement, 'id'>): string {
    const id = randomUUID();
    this.db.prepare('INSERT OR IGNORE INTO entitlements (id, principal_type, principal, target_type, target) VALUES (?, ?, ?, ?, ?)').run(id, e.principalType, e.principal, e.targetType, e.target);
    return id;
  }
  removeEntitlement(id: string): boolean {
    return this.db.prepare('DELETE FROM entitlements WHERE id = ?').run(id).changes > 0;
  }
  listEntitlements(): Entitlement[] {
    return (this.db.prepare('SELECT * FROM entitlements ORDER BY principal, target').all() as Raw[]).map((r) => ({ id: String(r.id), principalType: r.principal_type as Entitlement['principalType'], principal: String(r.principal), targetType: r.target_type as Entitlement['targetType'], target: String(r.target) }));
  }
  isEntitled(user: string, desktop: DesktopRow): boolean {
    const groups = this.groupsOf(user);
    return this.listEntitlements().some(
      (e) =>
        ((e.principalType === 'user' && e.principal === user) || (e.principalType === 'group' && groups.includes(e.principal))) &&
        ((e.targetType === 'desktop' && e.target === desktop.id) || (e.targetType === 'pool' && e.target === desktop.poolId)),
    );
  }

  // Devices
  createDevice(d: { user: string; name: string; publicKey: string; host: Record<string, unknown> }): string {
    const id = randomUUID();
    this.db.prepare('INSERT INTO devices (id, user_name, name, public_key, host, enrolled_at) VALUES (?, ?, ?, ?, ?, ?)').run(id, d.user, d.name, d.publicKey, json(d.host), now());
    return id;
  }
  getDevice(id: string): DeviceRow | null {
    const r = this.db.prepare('SELECT * FROM devices WHERE id = ?').get(id) as Raw | undefined;
    return r ? { id: String(r.id), user: String(r.user_name), name: String(r.name), publicKey: String(r.public_key), host: parse(r.host), enrolledAt: String(r.enrolled_at), lastSeen: (r.last_seen as string | null) ?? null } : null;
  }
  listDevices(): DeviceRow[] {
    return (this.db.prepare('SELECT id FROM devices ORDER BY enrolled_at').all() as Raw[]).map((r) => this.getDevice(String(r.id))!);
  }
  touchDevice(id: string, host?: Record<string, unknown>): void {
    if (host) this.db.prepare('UPDATE devices SET last_seen = ?, host = ? WHERE id = ?').run(now(), json(host), id);
    else this.db.prepare('UPDATE devices SET last_seen = ? WHERE id = ?').run(now(), id);
  }
  addHeartbeat(deviceId: string, stats: unknown): void {
    this.db.prepare('INSERT INTO heartbeats (device_id, time, stats) VALUES (?, ?, ?)').run(deviceId, now(), json(stats));
  }
  latestHeartbeats(deviceId: string, limit: number): { time: string; stats: unknown }[] {
    return (this.db.prepare('SELECT time, stats FROM heartbeats WHERE device_id = ? ORDER BY id DESC LIMIT ?').all(deviceId, limit) as Raw[]).map((r) => ({ time: String(r.time), stats: parse(r.stats) }));
  }

  // Checkouts (the lock is the partial unique index)
  insertCheckout(c: { desktopId: string; user: string; deviceId: string; checkpointSnapshot: string; leaseExpiresAt: string }): string {
    const id = randomUUID();
    const t = now();
    this.db.prepare('INSERT INTO checkouts (id, desktop_id, user_name, device_id, checkpoint_snapshot, state, lease_expires_at, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)').run(id, c.desktopId, c.user, c.deviceId, c.checkpointSnapshot, 'transferring', c.leaseExpiresAt, t, t);
    return id;
  }
  getCheckout(id: string): CheckoutRow | null {
    const r = this.db.prepare('SELECT * FROM checkouts WHERE id = ?').get(id) as Raw | undefined;
    return r ? this.checkoutRow(r) : null;
  }
  activeCheckout(desktopId: string): CheckoutRow | null {
    const r = this.db.prepare(`SELECT * FROM checkouts WHERE desktop_id = ? AND state IN ('transferring','checked_out','checking_in')`).get(desktopId) as Raw | undefined;
    return r ? this.checkoutRow(r) : null;
  }
  listCheckouts(filter: { activeOnly?: boolean } = {}): CheckoutRow[] {
    const sql = filter.activeOnly ? `SELECT * FROM checkouts WHERE state IN ('transferring','checked_out','checking_in') ORDER BY created_at` : 'SELECT * FROM checkouts ORDER BY created_at';
    return (this.db.prepare(sql).all() as Raw[]).map((r) => this.checkoutRow(r));
  }
  /** Compare-and-set on state: false when another request moved it first. */
  transitionCheckout(id: string, from: CheckoutState[], to: CheckoutState, patch: { jobId?: string | null; pendingDisks?: SnapshotDisk[] | null; leaseExpiresAt?: string } = {}): boolean {
    const cur = this.getCheckout(id);
    if (!cur || !from.includes(cur.state)) return false;
    const res = this.db.prepare('UPDATE checkouts SET state = ?, job_id = ?, pending_disks = ?, lease_expires_at = ?, updated_at = ? WHERE id = ? AND state = ?').run(
      to, patch.jobId === undefined ? cur.jobId : patch.jobId, patch.pendingDisks === undefined ? (cur.pendingDisks ? json(cur.pendingDisks) : null) : patch.pendingDisks ? json(patch.pendingDisks) : null,
      patch.leaseExpiresAt ?? cur.leaseExpiresAt, now(), id, cur.state);
    return res.changes === 1;
  }
  setCheckoutHeartbeat(id: string): void {
    this.db.prepare('UPDATE checkouts SET last_heartbeat = ? WHERE id = ?').run(now(), id);
  }
  private checkoutRow(r: Raw): CheckoutRow {
    return { id: String(r.id), desktopId: String(r.desktop_id), user: String(r.user_name), deviceId: String(r.device_id), checkpointSnapshot: String(r.checkpoint_snapshot), state: r.state as CheckoutState, leaseExpiresAt: String(r.lease_expires_at), jobId: (r.job_id as string | null) ?? null, pendingDisks: r.pending_disks ? parse(r.pending_disks) : null, lastHeartbeat: (r.last_heartbeat as string | null) ?? null, createdAt: String(r.created_at), updatedAt: String(r.updated_at) };
  }

  // Audit
  addEvent(e: { actor: string; desktopId?: string | null; action: string; outcome: string; detail?: string | null }): number {
    return appendEvent(this.db, e); // hash-chained: see audit-chain.ts
  }
  listEvents(f: { sinceId?: number; desktopId?: string; limit?: number } = {}): EventRow[] {
    const rows = this.db.prepare('SELECT * FROM events WHERE id > ? AND (? IS NULL OR desktop_id = ?) ORDER BY id LIMIT ?').all(f.sinceId ?? 0, f.desktopId ?? null, f.desktopId ?? null, f.limit ?? 1000) as Raw[];
    return rows.map((r) => ({ id: Number(r.id), time: String(r.time), actor: String(r.actor), desktopId: (r.desktop_id as string | null) ?? null, action: String(r.action), outcome: String(r.outcome), detail: (r.detail as string | null) ?? null }));
  }

  // Remote commands
  queueCommand(c: { deviceId: string; desktopId: string | null; type: string }): string {
    const id = randomUUID();
    this.db.prepare('INSERT INTO commands (id, device_id, desktop_id, type, created_at) VALUES (?, ?, ?, ?, ?)').run(id, c.deviceId, c.desktopId, c.type, now());
    return id;
  }
  pendingCommands(deviceId: string): CommandRow[] {
    return (this.db.prepare("SELECT * FROM commands WHERE device_id = ? AND state = 'pending' ORDER BY created_at").all(deviceId) as Raw[]).map((r) => this.commandRow(r));
  }
  listCommands(): CommandRow[] {
    return (this.db.prepare('SELECT * FROM commands ORDER BY created_at').all() as Raw[]).map((r) => this.commandRow(r));
  }
  ackCommand(id: string, deviceId: string, ok: boolean, message: string | null): boolean {
    return this.db.prepare("UPDATE commands SET state = ?, result = ?, acked_at = ? WHERE id = ? AND device_id = ? AND state = 'pending'").run(ok ? 'done' : 'failed', message, now(), id, deviceId).changes === 1;
  }
  private commandRow(r: Raw): CommandRow {
    return { id: String(r.id), deviceId: String(r.device_id), desktopId: (r.desktop_id as string | null) ?? null, type: String(r.type), state: String(r.state), result: (r.result as string | null) ?? null, createdAt: String(r.created_at) };
  }

  // Directory and audit operations of the admin console and CLI
  /** Deletes a group, its memberships and the entitlements granted to it. */
  deleteGroup(name: string): boolean {
    return this.transaction(() => {
      this.db.prepare("DELETE FROM entitlements WHERE principal_type = 'group' AND principal = ?").run(name);
      this.db.prepare('DELETE FROM group_members WHERE group_name = ?').run(name);
      return this.db.prepare('DELETE FROM groups WHERE name = ?').run(name).changes > 0;
    });
  }
  removeGroupMember(group: string, user: string): boolean {
    return this.db.prepare('DELETE FROM group_members WHERE group_name = ? AND user_name = ?').run(group, user).changes > 0;
  }
  /** Deletes an empty pool and the entitlements to it; false when it does not exist. */
  deletePool(id: string): boolean {
    return this.transaction(() => {
      this.db.prepare("DELETE FROM entitlements WHERE target_type = 'pool' AND target = ?").run(id);
      return this.db.prepare('DELETE FROM pools WHERE id = ?').run(id).changes > 0;
    });
  }
  /** Newest first, filtered; `text` matches actor, action, outcome or detail (case-insensitive). */
  listEventsNewest(f: { beforeId?: number; desktopId?: string; actor?: string; action?: string; outcome?: string; text?: string; limit?: number } = {}): EventRow[] {
    const like = f.text ? `%${f.text.replace(/[%_\\]/g, (c) => `\\${c}`)}%` : null;
    const rows = this.db.prepare(`SELECT * FROM events WHERE (? IS NULL OR id < ?) AND (? IS NULL OR desktop_id = ?) AND (? IS NULL OR actor = ?)
      AND (? IS NULL OR action = ?) AND (? IS NULL OR outcome = ?)
      AND (? IS NULL OR actor LIKE ? ESCAPE '\\' OR action LIKE ? ESCAPE '\\' OR outcome LIKE ? ESCAPE '\\' OR detail LIKE ? ESCAPE '\\')
      ORDER BY id DESC LIMIT ?`).all(
      f.beforeId ?? null, f.beforeId ?? null, f.desktopId ?? null, f.desktopId ?? null, f.actor ?? null, f.actor ?? null,
      f.action ?? null, f.action ?? null, f.outcome ?? null, f.outcome ?? null, like, like, like, like, like, f.limit ?? 200) as Raw[];
    return rows.map((r) => ({ id: Number(r.id), time: String(r.time), actor: String(r.actor), desktopId: (r.desktop_id as string | null) ?? null, action: String(r.action), outcome: String(r.outcome), detail: (r.detail as string | null) ?? null }));
  }
}

export type MetadataStore = SqliteMetadataStore;
