import type { Session } from '../api';

export interface PageProps {
  session: Session;
}
export interface CheckoutView { id: string; desktopId: string; user: string; deviceId: string; state: string; snapshotId: string; leaseExpiresAt: string; jobId: string | null; /** Why it stopped for good (admin list only), e.g. "damaged snapshot". */ failure?: string | null }
export interface AdminDesktop { id: string; name: string; poolId: string | null; config: { vcpus: number; ramMiB: number; disks: { name: string; sizeBytes: number }[] }; policy: Record<string, unknown>; currentSnapshot: string | null; powerState: string; createdAt: string; checkout: CheckoutView | null }
export interface Pool { id: string; name: string; policy: Record<string, unknown> }
export interface ImportJob { id: string; name: string; image: string; state: 'running' | 'done' | 'failed'; bytesDone: number; bytesTotal: number; startedAt: string; error: { code: string; message: string } | null }
export interface RestorePoint { id: string; kind: string; createdAt: string; parentId: string | null; sizeBytes: number; current: boolean }
export interface RestorePoints { desktopId: string; restorePoints: RestorePoint[]; canRestore: boolean; reason?: string }
/** A job's progress as the broker computes it for every view (docs/api.md, "Transfer progress"). */
export interface JobNumbers { bytesDone: number; chunksDone: number; bytesLocal: number | null; bytesTotal: number | null; percent: number | null; rate: number }
export interface Job extends JobNumbers { id: string; kind: string; state: string; queuePosition?: number; checkoutId: string; desktopId: string; desktop: string | null; user: string | null; deviceId: string | null; serverId: string | null }
/** `GET /v1/admin/checkouts`' per-check-out transfer: its open job with the same numbers. */
export interface CheckoutTransfer extends JobNumbers { jobId: string; kind: string; state: string; queuePosition?: number }
export interface TransferServer { id: string; url: string; slots: number; inUse: number; alive: boolean; rateIn: number; rateOut: number; bytesIn: number; bytesOut: number }
export interface Transfers { servers: TransferServer[]; queued: Job[]; active: Job[] }
export type Resolved = Record<string, { value: unknown; source: string }>;
