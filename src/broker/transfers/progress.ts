/** Per-job counters as a transfer server reports them (cumulative since the server started). */
export interface JobCounters {
  bytesIn: number;
  bytesOut: number;
  chunksIn: number;
  chunksOut: number;
}

/** What the laptop holding a check-out says it has (docs/api.md, "Transfer progress"). */
export interface LocalProgress {
  /** Plaintext bytes of the desktop's disks present on the laptop (holes not counted). */
  bytesLocal: number;
  /** Plaintext bytes of the desktop's disks that are not holes. */
  bytesTotal: number;
  /** Bytes the laptop has received on the wire for this job so far (blobs as sent: compressed, sealed). */
  bytesReceived?: number;
  /** Plaintext bytes the laptop copied from its own copies of clones instead of fetching them (counted in bytesLocal). */
  bytesCopiedLocally?: number;
}

export interface JobProgressView extends JobCounters {
  serverId: string;
  /**
   * Bytes per second on the wire over the last RATE_WINDOW_MS, counted where they arrive: the
   * laptop's count for a check-out (the server writes ahead into socket buffers, so its own count
   * leads and then stalls), the transfer server's for uploads.
   */
  rate: number;
  updatedAt: string;
  /** The laptop's own count, when it has reported one (check-outs). */
  local: LocalProgress | null;
}

/**
 * The rate is measured over a window of several reports: a transfer server writes blobs in
 * bursts (its socket buffers fill, then it waits for the laptop), so the difference between two
 * reports a second apart is often 0 while data flows.
 */
export const RATE_WINDOW_MS = 5_000;
/** No report for this long: the job is not moving (or its server is gone). */
const SILENT_MS = 15_000;

interface Sample { at: number; moved: number }
interface Entry { serverId: string; counters: JobCounters; samples: Sample[]; received: Sample[]; local: LocalProgress | null; at: number; localAt: number }

/** Appends a sample, keeping one older than the window (the rate's start) and those within it. */
function addSample(samples: Sample[], s: Sample): void {
  // A counter that went back (a new process resumed the job): the window starts again.
  if (samples.length && s.moved < samples[samples.length - 1]!.moved) samples.length = 0;
  samples.push(s);
  while (samples.length > 2 && s.at - samples[1]!.at >= RATE_WINDOW_MS) samples.shift();
}

/** Bytes per second between the oldest sample still in the window (or, past it, the newest before it) and the last. */
export function windowRate(samples: readonly Sample[], windowMs = RATE_WINDOW_MS): number {
  const last = samples[samples.length - 1];
  if (!last) return 0;
  // The newest sample at least a window old, else the oldest one: a rate over ≥ one window where there is one.
  let first = samples[0]!;
  for (const s of samples) if (last.at - s.at >= windowMs) first = s;
  const dt = (last.at - first.at) / 1000;
  return dt > 0 ? Math.max(0, (last.moved - first.moved) / dt) : 0;
}

/**
 * Live progress of transfer jobs: byte counters from transfer-server heartbeats (the rate), and
 * the laptop's own count of what it holds (the percentage). Kept in memory: a view for admins
 * (console, `carryon admin checkouts|transfers`), not state the broker decides anything by.
 */
export class JobProgress {
  private readonly jobs = new Map<string, Entry>();

  constructor(private readonly now: () => number = Date.now) {}

  report(serverId: string, jobs: Iterable<[string, JobCounters]>): void {
    const t = this.now();
    for (const [id, c] of jobs) {
      const e = this.entry(id, serverId, t);
      e.serverId = serverId;
      e.counters = { ...c };
      e.at = t;
      addSample(e.samples, { at: t, moved: c.bytesIn + c.bytesOut });
    }
    this.sweep(t);
  }

  /** The laptop's count for a job (it knows what it holds; the server only what it sent). */
  reportLocal(jobId: string, local: LocalProgress): void {
    const t = this.now();
    const e = this.entry(jobId, '', t);
    e.local = { bytesLocal: Math.min(local.bytesLocal, local.bytesTotal), bytesTotal: local.bytesTotal, bytesCopiedLocally: Math.min(local.bytesCopiedLocally ?? 0, local.bytesTotal) };
    e.localAt = t;
    if (local.bytesReceived !== undefined) addSample(e.received, { at: t, moved: local.bytesReceived });
    this.sweep(t);
  }

  get(jobId: string): JobProgressView | null {
    const e = this.jobs.get(jobId);
    if (!e) return null;
    const t = this.now();
    const fromLaptop = e.received.length > 0;
    const rate = t - (fromLaptop ? e.localAt : e.at) > SILENT_MS ? 0 : windowRate(fromLaptop ? e.received : e.samples);
    const { bytesReceived: _, ...local } = e.local ?? { bytesLocal: 0, bytesTotal: 0 };
    return { ...e.counters, serverId: e.serverId, rate, updatedAt: new Date(Math.max(e.at, e.localAt)).toISOString(), local: e.local ? local : null };
  }

  private entry(id: string, serverId: string, t: number): Entry {
    let e = this.jobs.get(id);
    if (!e) {
      e = { serverId, counters: { bytesIn: 0, bytesOut: 0, chunksIn: 0, chunksOut: 0 }, samples: [], received: [], local: null, at: 0, localAt: t };
      this.jobs.set(id, e);
    }
    return e;
  }

  private sweep(t: number): void {
    for (const [id, e] of this.jobs) if (t - Math.max(e.at, e.localAt) > 3600_000) this.jobs.delete(id);
  }
}

/** The one percentage every view shows for a job: the laptop's count; null until it has reported. */
export function jobPercent(local: LocalProgress | null): number | null {
  if (!local) return null;
  if (local.bytesTotal === 0) return 100;
  return Math.min(100, Math.round((1000 * local.bytesLocal) / local.bytesTotal) / 10);
}
