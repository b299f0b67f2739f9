import type { Migration, SqlConn, SqlDb } from '../../sql/driver.js';
import { compareVersions } from '../../core/tokens/release.js';

/**
 * Client releases and each device's update state (issue 28): a component of its own
 * ("releases"), versioned apart from the broker's tables; the same DDL on SQLite and PostgreSQL.
 * The bundles themselves are files in the data dir (routes/releases.ts says why).
 */
const V1 = `
CREATE TABLE releases (
  version TEXT PRIMARY KEY, sha256 TEXT NOT NULL, size INTEGER NOT NULL, manifest TEXT NOT NULL, signature TEXT NOT NULL,
  ring TEXT NOT NULL DEFAULT 'none', published_at TEXT NOT NULL, published_by TEXT NOT NULL, rolled_out_at TEXT);
CREATE TABLE device_updates (
  device_id TEXT PRIMARY KEY, ring TEXT NOT NULL DEFAULT 'stable', running_version TEXT, state TEXT, target_version TEXT,
  detail TEXT, updated_at TEXT);
`;
export const RELEASE_MIGRATIONS: Migration[] = [{ version: 1, sql: V1 }];

/** `none`: published, offered to nobody; `canary`: to canary devices; `all`: to every device. */
export type RolloutRing = 'none' | 'canary' | 'all';
export type DeviceRing = 'canary' | 'stable';

export interface ReleaseRow { version: string; sha256: string; size: number; manifest: string; signature: string; ring: RolloutRing; publishedAt: string; publishedBy: string; rolledOutAt: string | null }
export interface DeviceUpdateRow { deviceId: string; ring: DeviceRing; runningVersion: string | null; state: string | null; targetVersion: string | null; detail: string | null; updatedAt: string | null }

type Raw = Record<string, unknown>;
const str = (v: unknown): string | null => (v === null || v === undefined ? null : String(v));

function releaseRow(r: Raw): ReleaseRow {
  return {
    version: String(r.version), sha256: String(r.sha256), size: Number(r.size), manifest: String(r.manifest), signature: String(r.signature),
    ring: String(r.ring) as RolloutRing, publishedAt: String(r.published_at), publishedBy: String(r.published_by), rolledOutAt: str(r.rolled_out_at),
  };
}
function deviceRow(r: Raw): DeviceUpdateRow {
  return {
    deviceId: String(r.device_id), ring: r.ring === 'canary' ? 'canary' : 'stable', runningVersion: str(r.running_version), state: str(r.state),
    targetVersion: str(r.target_version), detail: str(r.detail), updatedAt: str(r.updated_at),
  };
}

export class ReleaseStore {
  constructor(private readonly sql: SqlConn) {}

  static async open(sql: SqlDb): Promise<ReleaseStore> {
    await sql.migrate('releases', RELEASE_MIGRATIONS);
    return new ReleaseStore(sql);
  }

  /** False when that version is already published (a version names one bundle for good). */
  async add(r: Omit<ReleaseRow, 'ring' | 'rolledOutAt'>): Promise<boolean> {
    return (await this.sql.run('INSERT INTO releases (version, sha256, size, manifest, signature, published_at, published_by) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(version) DO NOTHING',
      [r.version, r.sha256, r.size, r.manifest, r.signature, r.publishedAt, r.publishedBy])) === 1;
  }
  async release(version: string): Promise<ReleaseRow | null> {
    const r = await this.sql.get<Raw>('SELECT * FROM releases WHERE version = ?', [version]);
    return r ? releaseRow(r) : null;
  }
  /** Newest first (by version, not by when it was published). */
  async releases(): Promise<ReleaseRow[]> {
    return (await this.sql.all<Raw>('SELECT * FROM releases')).map(releaseRow).sort((a, b) => compareVersions(b.version, a.version));
  }
  async rollout(version: string, ring: RolloutRing): Promise<boolean> {
    return (await this.sql.run('UPDATE releases SET ring = ?, rolled_out_at = ? WHERE version = ?', [ring, ring === 'none' ? null : new Date().toISOString(), version])) === 1;
  }

  /**
   * The newest release rolled out to a device of this ring that is newer than what it runs: a
   * laptop that missed several releases is offered the newest at once.
   */
  async offerFor(ring: DeviceRing, running: string | null): Promise<ReleaseRow | null> {
    const visible = (await this.releases()).filter((r) => r.ring === 'all' || (r.ring === 'canary' && ring === 'canary'));
    const newest = visible[0];
    return newest && (!running || compareVersions(newest.version, running) > 0) ? newest : null;
  }

  async device(deviceId: string): Promise<DeviceUpdateRow> {
    const r = await this.sql.get<Raw>('SELECT * FROM device_updates WHERE device_id = ?', [deviceId]);
    return r ? deviceRow(r) : { deviceId, ring: 'stable', runningVersion: null, state: null, targetVersion: null, detail: null, updatedAt: null };
  }
  async devices(): Promise<DeviceUpdateRow[]> {
    return (await this.sql.all<Raw>('SELECT * FROM device_updates')).map(deviceRow);
  }
  async setRing(deviceId: string, ring: DeviceRing): Promise<void> {
    await this.sql.run('INSERT INTO device_updates (device_id, ring) VALUES (?, ?) ON CONFLICT(device_id) DO UPDATE SET ring = excluded.ring', [deviceId, ring]);
  }
  /** What the device says it runs (every heartbeat). */
  async setRunning(deviceId: string, version: string): Promise<void> {
    await this.sql.run('INSERT INTO device_updates (device_id, running_version) VALUES (?, ?) ON CONFLICT(device_id) DO UPDATE SET running_version = excluded.running_version', [deviceId, version]);
  }
  /** A step of an update, as the device reports it. */
  async setState(deviceId: string, s: { state: string; targetVersion: string; detail: string | null }): Promise<void> {
    await this.sql.run(`INSERT INTO device_updates (device_id, state, target_version, detail, updated_at) VALUES (?, ?, ?, ?, ?)
      ON CONFLICT(device_id) DO UPDATE SET state = excluded.state, target_version = excluded.target_version, detail = excluded.detail, updated_at = excluded.updated_at`,
    [deviceId, s.state, s.targetVersion, s.detail, new Date().toISOString()]);
  }
}
