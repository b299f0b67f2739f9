import type { Migration } from '../../sql/driver.js';

/** SQLite DDL → PostgreSQL's: BYTEA blobs, BIGSERIAL ids. */
export function postgresDdl(sql: string): string {
  return sql.replace(/INTEGER PRIMARY KEY AUTOINCREMENT/g, 'BIGSERIAL PRIMARY KEY').replace(/\bBLOB\b/g, 'BYTEA');
}


/** Broker tables. One active checkout per desktop is enforced by a partial unique index. */
const V1 = `
CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE users (
  name TEXT PRIMARY KEY, password_hash TEXT, role TEXT NOT NULL CHECK (role IN ('admin','user')),
  source TEXT NOT NULL DEFAULT 'local', disabled INTEGER NOT NULL DEFAULT 0, policy TEXT NOT NULL DEFAULT '{}',
  created_at TEXT NOT NULL);
CREATE TABLE groups (name TEXT PRIMARY KEY, created_at TEXT NOT NULL);
CREATE TABLE group_members (
  group_name TEXT NOT NULL REFERENCES groups(name) ON DELETE CASCADE,
  user_name TEXT NOT NULL REFERENCES users(name) ON DELETE CASCADE,
  PRIMARY KEY (group_name, user_name));
CREATE TABLE pools (id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE, policy TEXT NOT NULL DEFAULT '{}', created_at TEXT NOT NULL);
CREATE TABLE lineages (id TEXT PRIMARY KEY, wrapped_keys BLOB NOT NULL, created_at TEXT NOT NULL);
CREATE TABLE desktops (
  id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE, pool_id TEXT REFERENCES pools(id),
  lineage_id TEXT NOT NULL REFERENCES lineages(id), config TEXT NOT NULL, policy TEXT NOT NULL DEFAULT '{}',
  current_snapshot TEXT, power_state TEXT NOT NULL DEFAULT 'off', created_at TEXT NOT NULL);
CREATE TABLE snapshots (
  id TEXT PRIMARY KEY, desktop_id TEXT NOT NULL REFERENCES desktops(id) ON DELETE CASCADE,
  parent_id TEXT, kind TEXT NOT NULL, disks TEXT NOT NULL, created_at TEXT NOT NULL);
CREATE TABLE entitlements (
  id TEXT PRIMARY KEY, principal_type TEXT NOT NULL CHECK (principal_type IN ('user','group')),
  principal TEXT NOT NULL, target_type TEXT NOT NULL CHECK (target_type IN ('desktop','pool')),
  target TEXT NOT NULL, UNIQUE (principal_type, principal, target_type, target));
CREATE TABLE devices (
  id TEXT PRIMARY KEY, user_name TEXT NOT NULL REFERENCES users(name) ON DELETE CASCADE, name TEXT NOT NULL,
  public_key TEXT NOT NULL, host TEXT NOT NULL, enrolled_at TEXT NOT NULL, last_seen TEXT);
CREATE TABLE checkouts (
  id TEXT PRIMARY KEY, desktop_id TEXT NOT NULL REFERENCES desktops(id), user_name TEXT NOT NULL,
  device_id TEXT NOT NULL REFERENCES devices(id), checkpoint_snapshot TEXT NOT NULL, state TEXT NOT NULL,
  lease_expires_at TEXT NOT NULL, job_id TEXT, pending_disks TEXT, last_heartbeat TEXT,
  created_at TEXT NOT NULL, updated_at TEXT NOT NULL);
CREATE UNIQUE INDEX checkouts_one_active ON checkouts(desktop_id)
  WHERE state IN ('transferring','checked_out','checking_in');
CREATE TABLE events (
  id INTEGER PRIMARY KEY AUTOINCREMENT, time TEXT NOT NULL, actor TEXT NOT NULL, desktop_id TEXT,
  action TEXT NOT NULL, outcome TEXT NOT NULL, detail TEXT);
CREATE INDEX events_desktop ON events(desktop_id, id);
CREATE TABLE commands (
  id TEXT PRIMARY KEY, device_id TEXT NOT NULL REFERENCES devices(id) ON DELETE CASCADE, desktop_id TEXT,
  type TEXT NOT NULL, state TEXT NOT NULL DEFAULT 'pending', result TEXT, created_at TEXT NOT NULL, acked_at TEXT);
CREATE TABLE heartbeats (
  id INTEGER PRIMARY KEY AUTOINCREMENT, device_id TEXT NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
  time TEXT NOT NULL, stats TEXT NOT NULL);
CREATE INDEX heartbeats_device ON heartbeats(device_id, id);
`;

export const BROKER_MIGRATIONS: Migration[] = [
  // PostgreSQL has no rowid: snapshots get a sequence for their creation order.
  { version: 1, sql: V1, postgres: `${postgresDdl(V1)}\nALTER TABLE snapshots ADD COLUMN seq BIGSERIAL;` },
];
