import { createHash } from 'node:crypto';
import { z } from 'zod';

/** A USB class as two lower-case hex digits, or `*` for any. */
export const UsbClassCode = z.string().regex(/^([0-9a-f]{2}|\*)$/, 'a USB class is two hex digits (08 = storage) or *');
/** vendor:product in hex; the product may be `*` (every device of the vendor). */
export const UsbIdPattern = z.string().regex(/^[0-9a-f]{4}:([0-9a-f]{4}|\*)$/, 'a USB device is vendor:product in hex (046d:c52b, or 046d:* for a vendor)');

/** Policy values and their defaults. Layers override in order global → pool → desktop → user. */
export const PolicyValues = z.object({
  checkoutAllowed: z.boolean(),
  checkinAllowed: z.boolean(),
  rollbackAllowed: z.boolean(),
  maxLeaseHours: z.number().positive().max(24 * 365),
  heartbeatIntervalSec: z.number().int().min(5).max(86_400),
  /** Master switch: no USB controller and no device at all when false (the rules below then do nothing). */
  usbAllowed: z.boolean(),
  /**
   * USB classes a device may have to pass through (two hex digits as in the USB spec: 03 HID,
   * 07 printer, 08 storage, 0e video…); `*` = any class. A device passes when every class it
   * declares is listed, or when it is on `usbAllow` (devices/usb-rules.ts).
   */
  usbClasses: z.array(UsbClassCode).max(64),
  /** vendor:product (hex, `046d:*` for a vendor) that pass whatever their class. */
  usbAllow: z.array(UsbIdPattern).max(256),
  /** vendor:product that never pass: wins over everything else. */
  usbDeny: z.array(UsbIdPattern).max(256),
  /** Mass storage (class 08 on any interface) may pass through; false refuses it even when listed. */
  usbStorageAllowed: z.boolean(),
  /**
   * The guest may print: an IPP printer at 10.0.2.100:631 in its user network, relayed to the
   * laptop's CUPS socket, and USB printers (class 07) may be attached. False: neither path exists.
   */
  printingAllowed: z.boolean(),
  /** Whether `carryon export` may write the desktop's disk as a plaintext image (client enforces). */
  exportAllowed: z.boolean(),
  replicationIntervalMin: z.number().int().min(0).max(7 * 24 * 60),
  requireOnlineReauth: z.boolean(),
  /** Users may make a restore point of their desktop the version their next check-out starts from. */
  restoreAllowed: z.boolean(),
  /**
   * Upper bound on every transfer of the desktop (check-out, the download `run`/`serve` continue,
   * check-in, replicate), in KiB per second; 0 = no bound. The user's `--limit-rate` may only go
   * lower (client enforces; the value travels MACed in the check-out's state).
   */
  maxTransferRateKBps: z.number().int().min(0).max(100 * 1024 * 1024),
  /**
   * Upload rate of the agent's scheduled (background) replicas, KiB/s; 0 = bound only by
   * maxTransferRateKBps. Default 8 MiB/s, the pace a running desktop's background fold keeps, so a
   * background replica never sends faster than the laptop folds and leaves the link to the user. A
   * user's own replicate and check-in are not bound by it (client enforces: the broker's value at
   * each replica, else the check-out's).
   */
  replicationRateKBps: z.number().int().min(0).max(100 * 1024 * 1024),
  /** Users may start and stop the desktop on a datacenter host (`carryon start` / `stop`); admins always may. */
  onlineAllowed: z.boolean(),
  /** After a laptop's check-in the broker starts the desktop on a host by itself (the host pulls only the changed chunks). */
  startOnlineAfterCheckin: z.boolean(),
  /**
   * After check-in, rollback or cancel the laptop keeps the desktop's disk as a parked copy
   * (encrypted, opened only by the next check-out), so that check-out moves only what changed
   * (client/parked.ts). Client enforces, from the value kept MACed with the check-out.
   */
  keepLocalCopy: z.boolean(),
  /** A parked copy larger than this (GiB on the laptop's disk) is erased instead; 0 = no bound. */
  keepLocalCopyMaxGiB: z.number().min(0).max(1024 * 1024),
  /** A parked copy older than this (days) is erased instead of reused; 0 = no bound. */
  keepLocalCopyDays: z.number().min(0).max(3650),
});
export type PolicyValues = z.infer<typeof PolicyValues>;
export type PolicyName = keyof PolicyValues;
export const PolicyLayer = PolicyValues.partial().strict();
export type PolicyLayer = z.infer<typeof PolicyLayer>;

export const POLICY_DEFAULTS: PolicyValues = {
  checkoutAllowed: true,
  checkinAllowed: true,
  rollbackAllowed: true,
  maxLeaseHours: 7 * 24,
  heartbeatIntervalSec: 300,
  usbAllowed: false,
  // With usbAllowed, any device passes (what usbAllowed alone always meant): admins narrow it.
  usbClasses: ['*'],
  usbAllow: [],
  usbDeny: [],
  usbStorageAllowed: true,
  printingAllowed: false,
  exportAllowed: false,
  replicationIntervalMin: 0,
  requireOnlineReauth: true,
  restoreAllowed: false,
  maxTransferRateKBps: 0,
  replicationRateKBps: 8 * 1024,
  onlineAllowed: false,
  startOnlineAfterCheckin: false,
  keepLocalCopy: true,
  keepLocalCopyMaxGiB: 0,
  keepLocalCopyDays: 0,
};

export type PolicySource = 'default' | 'global' | `pool:${string}` | `desktop:${string}` | `user:${string}`;
export type ResolvedPolicy = { [K in PolicyName]: { value: PolicyValues[K]; source: PolicySource } };

export interface PolicyLayers {
  global?: PolicyLayer;
  pool?: { id: string; values: PolicyLayer };
  desktop?: { id: string; values: PolicyLayer };
  user?: { name: string; values: PolicyLayer };
}

/** Pure: the effective policy for one user on one desktop, each value with where it came from. */
export function resolvePolicy(layers: PolicyLayers): ResolvedPolicy {
  const out = {} as Record<PolicyName, { value: unknown; source: PolicySource }>;
  for (const name of Object.keys(POLICY_DEFAULTS) as PolicyName[]) out[name] = { value: POLICY_DEFAULTS[name], source: 'default' };
  const apply = (values: PolicyLayer | undefined, source: PolicySource) => {
    if (!values) return;
    for (const [name, value] of Object.entries(values) as [PolicyName, unknown][]) {
      if (value !== undefined) out[name] = { value, source };
    }
  };
  apply(layers.global, 'global');
  if (layers.pool) apply(layers.pool.values, `pool:${layers.pool.id}`);
  if (layers.desktop) apply(layers.desktop.values, `desktop:${layers.desktop.id}`);
  if (layers.user) apply(layers.user.values, `user:${layers.user.name}`);
  return out as ResolvedPolicy;
}

export function policyValues(resolved: ResolvedPolicy): PolicyValues {
  return Object.fromEntries(Object.entries(resolved).map(([k, v]) => [k, v.value])) as PolicyValues;
}

/** Hash of the effective values (sources excluded), canonical key order. */
export function policyHash(resolved: ResolvedPolicy): string {
  const values = policyValues(resolved);
  const canonical = JSON.stringify(Object.keys(values).sort().map((k) => [k, values[k as PolicyName]]));
  return createHash('sha256').update(canonical).digest('hex');
}
