/**
 * The broker's view of the transfer-slot scheduler. The check-out/check-in state machine uses
 * only this interface; src/broker/transfers/ implements it (database-backed, see docs/api.md).
 */
export type JobKind = 'checkout' | 'checkin' | 'replicate';
export type JobState = 'queued' | 'active' | 'paused' | 'done' | 'cancelled' | 'failed' | 'expired';

export interface JobView {
  id: string;
  kind: JobKind;
  state: JobState;
  queuePosition?: number;
  transfer?: {
    url: string;
    fingerprint: string;
    /** Through a gateway: the SNI name to present to `url` (the gateway's) to reach the server. */
    servername?: string;
    ticket: string;
    ticketExpiresAt: string;
    maxStreams: number;
  };
}

export interface JobRequest {
  kind: JobKind;
  checkoutId: string;
  desktopId: string;
  /** Digests of the manifests (already in the chunk store) whose chunks the ticket covers. */
  manifests: string[];
  /** Upload jobs: the checkout's checkpoint manifests (presence is told, and deltas based, only on these). */
  baseManifests?: string[];
  /** Lineage keys wrapped by the datacenter master key (base64), and the wrap context. */
  wrappedKeys: string;
  keyContext: string;
  /** A replica nobody waits for (the agent's): queued last, rebuilt on the transfer server in the idle CPU class. */
  background?: boolean;
}

export interface TransferScheduler {
  /** Queues a job; it becomes active (with a ticket) as soon as a slot is free. */
  enqueue(req: JobRequest): Promise<JobView>;
  /** Current view; renews the ticket of an active job. Null when unknown. */
  get(jobId: string): Promise<JobView | null>;
  /** Ends a job and frees its slot. Idempotent. */
  finish(jobId: string, outcome: 'done' | 'cancelled' | 'failed'): Promise<void>;
  pause(jobId: string): Promise<JobView | null>;
  resume(jobId: string): Promise<JobView | null>;
  /** Ends every unfinished job of a checkout (cancel, rollback, force-unlock). */
  finishForCheckout(checkoutId: string, outcome: 'cancelled' | 'failed'): Promise<void>;
}
