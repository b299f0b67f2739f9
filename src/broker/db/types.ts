import type { ChainCheck } from './audit-chain.js';

/** Rows as the broker sees them (JSON columns already parsed). */
export interface UserRow { name: string; passwordHash: string | null; role: 'admin' | 'user'; source: string; disabled: boolean; policy: Record<string, unknown> }
export interface DesktopRow { id: string; name: string; poolId: string | null; lineageId: string; config: DesktopConfig; policy: Record<string, unknown>; currentSnapshot: string | null; powerState: string; createdAt: string }
export interface DesktopConfig { vcpus: number; ramMiB: number; minRamMiB: number; nic: 'user' | 'none'; usb: boolean; disks: { name: string; sizeBytes: number }[] }
export interface SnapshotDisk { name: string; digest: string; sizeBytes: number; chunkSize: number }
export interface SnapshotRow { id: string; desktopId: string; parentId: string | null; kind: string; disks: SnapshotDisk[]; createdAt: string }
/** `wiped`: ended by a remote wipe the device acknowledged (its work since the checkpoint is gone). */
export type CheckoutState = 'transferring' | 'checked_out' | 'checking_in' | 'checked_in' | 'cancelled' | 'rolled_back' | 'wiped';
export const ACTIVE_STATES: CheckoutState[] = ['transferring', 'checked_out', 'checking_in'];
export interface CheckoutRow { id: string; desktopId: string; user: string; deviceId: string; checkpointSnapshot: string; state: CheckoutState; leaseExpiresAt: string; jobId: string | null; pendingDisks: SnapshotDisk[] | null; lastHeartbeat: string | null; createdAt: string; updatedAt: string }
export interface DeviceRow { id: string; user: string; name: string; publicKey: string; host: Record<string, unknown>; enrolledAt: string; lastSeen: string | null }
export interface EventRow { id: number; time: string; actor: string; desktopId: string | null; action: string; outcome: string; detail: string | null }
export interface CommandRow { id: string; deviceId: string; desktopId: string | null; type: string; state: string; result: string | null; createdAt: string }
export interface Entitlement { id: string; principalType: 'user' | 'group'; principal: string; targetType: 'desktop' | 'pool'; target: string }
export interface PoolRow { id: string; name: string; policy: Record<string, unknown> }
export type Policy = Record<string, unknown>;

export interface NewEvent { actor: string; desktopId?: string | null; action: string; outcome: string; detail?: string | null }
export interface EventFilter { beforeId?: number; desktopId?: string; actor?: string; action?: string; outcome?: string; text?: string; limit?: number }
export interface CheckoutPatch { jobId?: string | null; pendingDisks?: SnapshotDisk[] | null; leaseExpiresAt?: string }

/**
 * The broker's metadata: domain methods only, so SQLite (the default) and PostgreSQL (several
 * brokers on one database) implement it alike and no SQL leaks to callers. Every check-and-set
 * step is one statement or runs inside `transaction`.
 */
export interface MetadataStore {
  /**
   * Runs `fn` atomically: use `tx` (not this store) inside it. On SQLite other calls wait for it;
   * on PostgreSQL it is a database transaction (READ COMMITTED; writes to one row serialise).
   */
  transaction<T>(fn: (tx: MetadataStore) => Promise<T>): Promise<T>;

  getSetting(key: string): Promise<string | null>;
  setSetting(key: string, value: string): Promise<void>;

  createUser(u: { name: string; passwordHash: string | null; role: 'admin' | 'user'; source?: string }): Promise<void>;
  getUser(name: string): Promise<UserRow | null>;
  listUsers(): Promise<UserRow[]>;
  updateUser(name: string, patch: { passwordHash?: string; role?: 'admin' | 'user'; disabled?: boolean; policy?: Policy }): Promise<boolean>;
  deleteUser(name: string): Promise<boolean>;
  createGroup(name: string): Promise<void>;
  listGroups(): Promise<{ name: string; members: string[] }[]>;
  addGroupMember(group: string, user: string): Promise<void>;
  removeGroupMember(group: string, user: string): Promise<boolean>;
  groupsOf(user: string): Promise<string[]>;
  /** Deletes a group, its memberships and the entitlements granted to it. */
  deleteGroup(name: string): Promise<boolean>;

  createPool(name: string, policy?: Policy): Promise<string>;
  getPool(idOrName: string): Promise<PoolRow | null>;
  listPools(): Promise<PoolRow[]>;
  setPoolPolicy(id: string, policy: Policy): Promise<void>;
  /** Deletes a pool and the entitlements to it; false when it does not exist. */
  deletePool(id: string): Promise<boolean>;

  createLineage(wrappedKeys: Buffer, id?: string): Promise<string>;
  setLineageKeys(id: string, wrappedKeys: Buffer): Promise<void>;
  getLineageKeys(id: string): Promise<Buffer | null>;

  createDesktop(d: { id?: string; name: string; poolId: string | null; lineageId: string; config: DesktopConfig }): Promise<string>;
  getDesktop(idOrName: string): Promise<DesktopRow | null>;
  listDesktops(): Promise<DesktopRow[]>;
  setDesktopPolicy(id: string, policy: Policy): Promise<void>;
  setDesktopSnapshot(id: string, snapshotId: string): Promise<void>;
  setPowerState(id: string, state: string): Promise<void>;
  deleteDesktop(id: string): Promise<void>;

  createSnapshot(s: { desktopId: string; parentId: string | null; kind: string; disks: SnapshotDisk[] }): Promise<string>;
  getSnapshot(id: string): Promise<SnapshotRow | null>;
  listSnapshots(desktopId: string): Promise<SnapshotRow[]>;
  /**
   * Deletes snapshots (retention), never a desktop's current snapshot nor the checkpoint of an
   * active check-out, whatever the caller computed earlier. Returns the ids really deleted.
   */
  deleteSnapshots(ids: readonly string[]): Promise<string[]>;

  addEntitlement(e: Omit<Entitlement, 'id'>): Promise<string>;
  removeEntitlement(id: string): Promise<boolean>;
  listEntitlements(): Promise<Entitlement[]>;
  isEntitled(user: string, desktop: DesktopRow): Promise<boolean>;

  createDevice(d: { user: string; name: string; publicKey: string; host: Record<string, unknown> }): Promise<string>;
  getDevice(id: string): Promise<DeviceRow | null>;
  listDevices(): Promise<DeviceRow[]>;
  touchDevice(id: string, host?: Record<string, unknown>): Promise<void>;
  addHeartbeat(deviceId: string, stats: unknown): Promise<void>;
  latestHeartbeats(deviceId: string, limit: number): Promise<{ time: string; stats: unknown }[]>;
  deviceRevokedAt(id: string): Promise<string | null>;
  /** Marks the device revoked; false when it already was (or does not exist). */
  revokeDevice(id: string): Promise<boolean>;
  /**
   * Replay protection for device-signed requests, shared by every broker on the database: true
   * the first time (device, nonce) is seen within `windowMs`, false for a replay.
   */
  acceptNonce(deviceId: string, nonce: string, windowMs: number): Promise<boolean>;
  /** Failed-login backoff (src/broker/auth/throttle.ts `FailureLog`), shared by every broker on the database. */
  loginBlockedUntil(keys: readonly string[]): Promise<number>;
  recordLoginFailure(key: string, at: number, forgetAfterMs: number): Promise<number>;
  blockLogin(key: string, until: number): Promise<void>;
  clearLoginFailures(key: string): Promise<void>;
  /**
   * One atomic step: unless `key` is blocked at `at`, counts an attempt and blocks the key for
   * `delays[count - 1]` (the last entry for larger counts); the new count, or null when blocked.
   */
  reserveLoginAttempt(key: string, at: number, forgetAfterMs: number, delays: readonly number[]): Promise<number | null>;
  /** Takes back one counted attempt (it succeeded, or was never judged). */
  releaseLoginAttempt(key: string): Promise<void>;

  /** The lock: a new active check-out, or null when the desktop already has one (the unique index decides races). */
  insertCheckout(c: { desktopId: string; user: string; deviceId: string; checkpointSnapshot: string; leaseExpiresAt: string }): Promise<string | null>;
  getCheckout(id: string): Promise<CheckoutRow | null>;
  activeCheckout(desktopId: string): Promise<CheckoutRow | null>;
  /** The desktop's most recent check-out, in whatever state (the device that holds or last held it). */
  latestCheckout(desktopId: string): Promise<CheckoutRow | null>;
  listCheckouts(filter?: { activeOnly?: boolean }): Promise<CheckoutRow[]>;
  /** Compare-and-set on state: false when another request moved it first. */
  transitionCheckout(id: string, from: CheckoutState[], to: CheckoutState, patch?: CheckoutPatch): Promise<boolean>;
  setCheckoutHeartbeat(id: string): Promise<void>;
  /** A new checkpoint (check-out's snapshot, or a replica); `endUpload` clears the pending upload. */
  setCheckoutCheckpoint(id: string, snapshotId: string, opts?: { endUpload?: boolean }): Promise<boolean>;
  checkoutCutOffAt(id: string): Promise<string | null>;
  setCheckoutCutOff(id: string, at: string | null): Promise<void>;

  /** Appends to the hash-chained audit trail (serialised across brokers). */
  addEvent(e: NewEvent): Promise<number>;
  listEvents(f?: { sinceId?: number; desktopId?: string; limit?: number }): Promise<EventRow[]>;
  /** Newest first, filtered; `text` matches actor, action, outcome or detail (case-insensitive). */
  listEventsNewest(f?: EventFilter): Promise<EventRow[]>;
  verifyAuditChain(): Promise<ChainCheck>;
  /** Events after `sinceId`, oldest first, with their links: one JSON object per line. */
  exportEvents(sinceId?: number, limit?: number): Promise<string>;

  queueCommand(c: { deviceId: string; desktopId: string | null; type: string }): Promise<string>;
  pendingCommands(deviceId: string): Promise<CommandRow[]>;
  listCommands(): Promise<CommandRow[]>;
  ackCommand(id: string, deviceId: string, ok: boolean, message: string | null): Promise<boolean>;
}
