import type { JobKind } from './types.js';

/** Pure slot assignment: which queued jobs start now, and where. */
export interface ServerSlots {
  id: string;
  slots: number;
  active: number;
}

export interface QueuedJob {
  id: string;
  kind: JobKind;
  seq: number;
  /** The agent's scheduled replica (a row's 0/1): after every job a user waits for. */
  background?: boolean | number;
}

/** Check-ins and replications first (they free locks and protect offline work), then FIFO; background replicas after all of them. */
export function jobPriority(kind: JobKind): number {
  return kind === 'checkout' ? 1 : 0;
}

export function orderQueue<T extends QueuedJob>(queue: readonly T[]): T[] {
  return [...queue].sort((a, b) => Number(Boolean(a.background)) - Number(Boolean(b.background)) || jobPriority(a.kind) - jobPriority(b.kind) || a.seq - b.seq);
}

/** Each job in queue order goes to the server with the most free slots (ties: lowest id). */
export function assignJobs(servers: readonly ServerSlots[], queue: readonly QueuedJob[]): { jobId: string; serverId: string }[] {
  const free = servers.map((s) => ({ id: s.id, free: s.slots - s.active })).filter((s) => s.free > 0);
  const out: { jobId: string; serverId: string }[] = [];
  for (const job of orderQueue(queue)) {
    free.sort((a, b) => b.free - a.free || a.id.localeCompare(b.id));
    const target = free[0];
    if (!target || target.free <= 0) break;
    target.free--;
    out.push({ jobId: job.id, serverId: target.id });
  }
  return out;
}
