/** Per-job counters as a transfer server reports them (cumulative since the server started). */
export interface JobCounters {
  bytesIn: number;
  bytesOut: number;
  chunksIn: number;
  chunksOut: number;
}

export interface JobProgressView extends JobCounters {
  serverId: string;
  /** Bytes per second (in + out) between the last two reports. */
  rate: number;
  updatedAt: string;
}

/**
 * Live progress of transfer jobs, fed by transfer-server heartbeats. Kept in memory: it is a
 * view for admins (console, `carryon admin transfers`), not state the broker decides anything by.
 */
export class JobProgress {
  private readonly jobs = new Map<string, JobProgressView & { at: number }>();

  constructor(private readonly now: () => number = Date.now) {}

  report(serverId: string, jobs: Iterable<[string, JobCounters]>): void {
    const t = this.now();
    for (const [id, c] of jobs) {
      const prev = this.jobs.get(id);
      const moved = c.bytesIn + c.bytesOut;
      let rate = 0;
      if (prev) {
        const dt = Math.max(0.001, (t - prev.at) / 1000);
        rate = Math.max(0, (moved - prev.bytesIn - prev.bytesOut) / dt);
        // An unchanged report a fraction of a second later keeps the last measured rate.
        if (moved === prev.bytesIn + prev.bytesOut && t - prev.at < 500) rate = prev.rate;
      }
      this.jobs.set(id, { ...c, serverId, rate, at: t, updatedAt: new Date(t).toISOString() });
    }
    for (const [id, j] of this.jobs) if (t - j.at > 3600_000) this.jobs.delete(id);
  }

  get(jobId: string): JobProgressView | null {
    const j = this.jobs.get(jobId);
    if (!j) return null;
    const { at, ...view } = j;
    // No report for a while: the job is not moving (or its server is gone).
    return this.now() - at > 15_000 ? { ...view, rate: 0 } : view;
  }
}
