import { z } from 'zod';
import { chunkLength } from '../../core/chunks/chunking.js';
import type { Manifest } from '../../core/chunks/manifest.js';
import type { BrokerClient } from '../../net/broker-client.js';
import { readFillReport, writeFillReport } from '../disks/disks.js';
import type { DesktopRecords, DesktopState } from '../disks/state.js';

/*
 * The laptop's side of "how far is this check-out" (docs/api.md, "Transfer progress"): plaintext
 * bytes of the desktop's disks present locally, over the disk bytes that are not holes. The
 * laptop is the only party that knows what it holds (a resumed check-out starts part-way; the
 * transfer server only knows what it sent, and sends ahead of what the laptop has written), so
 * it computes the number and tells the broker, which shows it in every admin view.
 */

/** Plaintext bytes of a disk that are not holes. */
export function dataBytes(m: Manifest): number {
  let n = 0;
  m.chunks.forEach((id, i) => {
    if (id) n += chunkLength(i, m.diskSize, m.chunkSize);
  });
  return n;
}

/**
 * For a fill that walks the disk in order (QEMU's block-stream): the data bytes present once it
 * has reached `offset`, given the chunks that were already there when it started.
 */
export function presentBelow(m: Manifest, present: ReadonlySet<number>): (offset: number) => number {
  // Prefix sums of the data bytes still missing at the start: one pass, then O(1) per report.
  const missing = new Float64Array(m.chunks.length + 1);
  let already = 0;
  m.chunks.forEach((id, i) => {
    const len = id ? chunkLength(i, m.diskSize, m.chunkSize) : 0;
    if (present.has(i)) already += len;
    missing[i + 1] = missing[i]! + (present.has(i) ? 0 : len);
  });
  return (offset) => already + missing[offset >= m.diskSize ? m.chunks.length : Math.max(0, Math.floor(offset / m.chunkSize))]!;
}

/** Data bytes of `m` at the `present` indexes (a loop over those only: a second check-out's 16384 were ≈ 11 ms cold through `presentBelow`). */
export function presentBytes(m: Manifest, present: ReadonlySet<number>): number {
  let n = 0;
  for (const i of present) if (m.chunks[i]) n += chunkLength(i, m.diskSize, m.chunkSize);
  return n;
}

/** What this check-out's work is made of so far: chunks copied on this laptop (and their plaintext bytes) and chunks fetched. */
export interface LocalCounts {
  copiedChunks: number;
  copiedBytes: number;
  fetchedChunks: number;
}

/** `status`: the counts the process filling the desktop last published (null when none is filling it). */
export async function fillCounts(vault: DesktopRecords, s: DesktopState): Promise<{ copiedChunks: number; fetchedChunks: number } | null> {
  if (s.disks.every((d) => d.complete)) return null;
  const fill = await readFillReport(vault, s.desktopId);
  return fill ? { copiedChunks: fill.copiedChunks ?? 0, fetchedChunks: fill.fetchedChunks ?? 0 } : null;
}

/** `status` and the agent's heartbeat: the same percentage the broker shows. */
export async function percentLocal(vault: DesktopRecords, s: DesktopState): Promise<number> {
  if (s.disks.every((d) => d.complete)) return 100;
  const fill = await readFillReport(vault, s.desktopId);
  return fill && fill.total > 0 ? Math.min(100, (100 * fill.done) / fill.total) : 0;
}

/**
 * Publishes the laptop's count once a second: to `fill.json` (for `status` in another process)
 * and to the broker (`POST /v1/jobs/:id/progress`, for the admin views), the same numbers to both.
 */
export class LocalProgressReporter {
  private last = 0;
  private sending: Promise<unknown> | null = null;
  /** Wire bytes of earlier attempts (each retry's transfer counts from 0 again). */
  private receivedBefore = 0;
  private lastReceived = 0;
  private counts: LocalCounts = { copiedChunks: 0, copiedBytes: 0, fetchedChunks: 0 };

  constructor(private readonly o: { vault: DesktopRecords; desktopId: string; broker?: BrokerClient | null; jobId?: string | null; everyMs?: number }) {}

  /** Chunks copied locally and fetched so far (published with the next update). */
  setCounts(c: LocalCounts): void {
    this.counts = { ...c };
  }

  /** `bytesReceived`: wire bytes this attempt received (the broker's rate is measured on them). */
  update(bytesLocal: number, bytesTotal: number, bytesReceived: number, force = false): void {
    if (bytesReceived < this.lastReceived) this.receivedBefore += this.lastReceived;
    this.lastReceived = bytesReceived;
    const now = Date.now();
    if (!force && now - this.last < (this.o.everyMs ?? 1000)) return;
    this.last = now;
    const done = Math.min(bytesLocal, bytesTotal);
    void writeFillReport(this.o.vault, this.o.desktopId, { pid: process.pid, done, total: bytesTotal, updatedAt: new Date(now).toISOString(), failures: [], copiedChunks: this.counts.copiedChunks, fetchedChunks: this.counts.fetchedChunks }).catch(() => undefined);
    const { broker, jobId } = this.o;
    // One report in flight at a time; a slow broker skips reports rather than queueing them.
    if (!broker || !jobId || this.sending) return;
    this.sending = broker.call('POST', `/v1/jobs/${encodeURIComponent(jobId)}/progress`, { bytesLocal: done, bytesTotal, bytesReceived: this.receivedBefore + bytesReceived, bytesCopiedLocally: this.counts.copiedBytes }, z.object({ ok: z.boolean() }))
      .catch(() => undefined).finally(() => (this.sending = null));
  }

  /** Waits for the report in flight (before the broker client closes). */
  async settle(): Promise<void> {
    await this.sending;
  }
}
