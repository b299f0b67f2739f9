import type { CheckoutRow, CheckoutState, CommandRow, DesktopRow, DeviceRow, Entitlement, EventRow, PoolRow, SnapshotRow, UserRow } from './types.js';

/** Column rows → domain rows, the same for SQLite and PostgreSQL (both store JSON as TEXT). */
export type Raw = Record<string, unknown>;

export const parse = <T>(v: unknown): T => JSON.parse(String(v)) as T;
const str = (v: unknown): string | null => (v === null || v === undefined ? null : String(v));

export function userRow(r: Raw): UserRow {
  return { name: String(r.name), passwordHash: str(r.password_hash), role: r.role as UserRow['role'], source: String(r.source), disabled: Number(r.disabled) === 1, policy: parse(r.policy) };
}

export function poolRow(r: Raw): PoolRow {
  return { id: String(r.id), name: String(r.name), policy: parse(r.policy) };
}

export function desktopRow(r: Raw): DesktopRow {
  return {
    id: String(r.id), name: String(r.name), poolId: str(r.pool_id), lineageId: String(r.lineage_id), config: parse(r.config), policy: parse(r.policy),
    currentSnapshot: str(r.current_snapshot), powerState: String(r.power_state), createdAt: String(r.created_at),
  };
}

export function snapshotRow(r: Raw): SnapshotRow {
  return { id: String(r.id), desktopId: String(r.desktop_id), parentId: str(r.parent_id), kind: String(r.kind), disks: parse(r.disks), createdAt: String(r.created_at) };
}

export function entitlementRow(r: Raw): Entitlement {
  return { id: String(r.id), principalType: r.principal_type as Entitlement['principalType'], principal: String(r.principal), targetType: r.target_type as Entitlement['targetType'], target: String(r.target) };
}

export function deviceRow(r: Raw): DeviceRow {
  return { id: String(r.id), user: String(r.user_name), name: String(r.name), publicKey: String(r.public_key), host: parse(r.host), enrolledAt: String(r.enrolled_at), lastSeen: str(r.last_seen) };
}

export function checkoutRow(r: Raw): CheckoutRow {
  return {
    id: String(r.id), desktopId: String(r.desktop_id), user: String(r.user_name), deviceId: String(r.device_id), checkpointSnapshot: String(r.checkpoint_snapshot),
    state: r.state as CheckoutState, leaseExpiresAt: String(r.lease_expires_at), jobId: str(r.job_id), pendingDisks: r.pending_disks ? parse(r.pending_disks) : null,
    lastHeartbeat: str(r.last_heartbeat), createdAt: String(r.created_at), updatedAt: String(r.updated_at),
  };
}

export function eventRow(r: Raw): EventRow {
  return { id: Number(r.id), time: String(r.time), actor: String(r.actor), desktopId: str(r.desktop_id), action: String(r.action), outcome: String(r.outcome), detail: str(r.detail) };
}

export function commandRow(r: Raw): CommandRow {
  return { id: String(r.id), deviceId: String(r.device_id), desktopId: str(r.desktop_id), type: String(r.type), state: String(r.state), result: str(r.result), createdAt: String(r.created_at) };
}
