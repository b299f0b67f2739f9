import type { ChunkId } from '../core/chunk-id.js';
import { CarryonError } from '../core/errors.js';
import { unwrapLineageKeys, type LineageKeys } from '../core/keys.js';
import { decodeManifest, referencedChunks } from '../core/chunks/manifest.js';
import { TicketError, type TicketPayload } from '../core/tokens/ticket.js';
import type { ChunkStore } from '../store/chunk-store.js';

/** What one job may move on this server, loaded once per job from its ticket's manifests. */
export interface Scope {
  /**
   * Chunks the ticket's manifests reference: the only ones served. Nothing is accepted under an
   * ID its sender gives: pages frames carry none, this server names what it rebuilds.
   */
  allowed: Set<ChunkId>;
  /**
   * Chunks of the checkout's checkpoint (upload tickets: `baseManifests`; download: = allowed).
   * Only these may be a pages frame's base, and only for these, and for chunks this checkout
   * pushed itself, is a pushed chunk counted a duplicate. Anything else would be an oracle for
   * chunks of other desktops in the shared store.
   */
  base: Set<ChunkId>;
  /**
   * Chunks this checkout has pushed here (any of its upload jobs): the same chunk pushed again by
   * a check-in killed and begun again (a new job) counts as a duplicate.
   */
  pushed: Set<ChunkId>;
  keys: LineageKeys;
}

export interface JobCounters {
  bytesIn: number;
  bytesOut: number;
  chunksIn: number;
  chunksOut: number;
}

/** Per-job chunk access, reported to the broker (which audits it) when the job leaves this server. */
export interface JobSummary extends JobCounters {
  jobId: string;
  checkoutId: string;
  desktopId: string;
  direction: 'download' | 'upload';
  firstAt: string;
  lastAt: string;
  /** Why it was evicted: its ticket expired, or the broker said the job ended / was revoked. */
  reason: 'expired' | 'ended';
}

interface Entry {
  key: string;
  scope: Promise<Scope>;
  expiresAt: number;
  ticket: TicketPayload;
  counters: JobCounters;
  firstAt: number;
  lastAt: number;
}

const MAX_PENDING_SUMMARIES = 10_000;
/** How long a revocation pushed by the broker is kept beside the heartbeat's list (longer than any ticket lives). */
const PUSHED_REVOCATION_MS = 3600_000;
const MAX_PUSHED_REVOCATIONS = 100_000;
/** How long a checkout's pushed-chunk set outlives its newest upload ticket. */
const PUSHED_GRACE_MS = 3600_000;

/**
 * Per-job state of a transfer server, bounded: an entry lives until its newest ticket expires or
 * the broker says the job ended (revocation list), whichever is first. The revocation list is the
 * broker's: replaced wholesale at every heartbeat, so it stays as small as the set of jobs ended
 * within one ticket lifetime.
 */
export class JobScopes {
  private readonly entries = new Map<string, Entry>();
  private revoked = new Set<string>();
  /** Revocations the broker pushed (job → when): kept past a heartbeat answered before them. */
  private readonly pushedRevoked = new Map<string, number>();
  private readonly pushedByCheckout = new Map<string, { ids: Set<ChunkId>; expiresAt: number }>();
  private summaries: JobSummary[] = [];
  private lastSweep = 0;
  /** Summaries dropped because nobody drained them (broker unreachable for a long time). */
  droppedSummaries = 0;

  constructor(
    private readonly store: ChunkStore,
    private readonly masterKey: Buffer,
    private readonly now: () => number = Date.now,
    private readonly onEvict: (jobId: string) => void = () => undefined,
  ) {}

  /** The scope of a verified ticket; refuses a revoked job's tickets. */
  get(t: TicketPayload): { scope: Promise<Scope>; counters: JobCounters } {
    this.maybeSweep();
    if (this.isRevoked(t.jobId)) throw new TicketError('revoked', `job ${t.jobId} was ended or revoked by the broker`);
    const key = `${t.manifests.join(',')}|${(t.baseManifests ?? []).join(',')}|${t.keyContext}`;
    let e = this.entries.get(t.jobId);
    if (e && e.key !== key) {
      this.evict(t.jobId, 'ended');
      e = undefined;
    }
    const expiresAt = Date.parse(t.expiresAt);
    if (!e) {
      const scope = this.load(t);
      e = { key, scope, expiresAt, ticket: t, counters: { bytesIn: 0, bytesOut: 0, chunksIn: 0, chunksOut: 0 }, firstAt: this.now(), lastAt: this.now() };
      const entry = e;
      this.entries.set(t.jobId, entry);
      scope.catch(() => {
        if (this.entries.get(t.jobId) === entry) this.entries.delete(t.jobId);
      });
    }
    e.expiresAt = Math.max(e.expiresAt, expiresAt);
    e.lastAt = this.now();
    if (t.direction === 'upload') {
      const p = this.pushedOf(t.checkoutId);
      p.expiresAt = Math.max(p.expiresAt, expiresAt + PUSHED_GRACE_MS);
    }
    return { scope: e.scope, counters: e.counters };
  }

  /** Replaces the broker's revocation list (job IDs whose tickets must stop working now). */
  setRevoked(jobIds: Iterable<string>): void {
    this.revoked = new Set(jobIds);
    for (const id of this.revoked) if (this.entries.has(id)) this.evict(id, 'ended');
  }

  /**
   * Adds revocations the broker pushed the moment jobs ended. Kept for an hour whatever the
   * heartbeat says, so a heartbeat answered just before the cancel cannot bring a ticket back.
   */
  addRevoked(jobIds: Iterable<string>): void {
    const at = this.now();
    for (const id of jobIds) {
      this.pushedRevoked.delete(id);
      this.pushedRevoked.set(id, at);
      if (this.entries.has(id)) this.evict(id, 'ended');
    }
    // Oldest first (insertion order): the bound drops those whose tickets lapsed longest ago.
    for (const id of this.pushedRevoked.keys()) {
      if (this.pushedRevoked.size <= MAX_PUSHED_REVOCATIONS) break;
      this.pushedRevoked.delete(id);
    }
  }

  isRevoked(jobId: string): boolean {
    return this.revoked.has(jobId) || this.pushedRevoked.has(jobId);
  }

  /** Evicts every entry whose newest ticket has expired. */
  sweep(): void {
    this.lastSweep = this.now();
    for (const [id, e] of this.entries) if (e.expiresAt <= this.lastSweep) this.evict(id, 'expired');
    for (const [id, p] of this.pushedByCheckout) if (p.expiresAt <= this.lastSweep) this.pushedByCheckout.delete(id);
    for (const [id, at] of this.pushedRevoked) if (at + PUSHED_REVOCATION_MS <= this.lastSweep) this.pushedRevoked.delete(id);
  }

  /** Summaries of jobs evicted since the last call (the heartbeat carries them to the broker). */
  drainSummaries(): JobSummary[] {
    const out = this.summaries;
    this.summaries = [];
    return out;
  }

  /** How much per-job state is held (the soak test watches these stay flat). */
  sizes(): { scopes: number; revoked: number; pendingSummaries: number; checkoutSets: number } {
    return { scopes: this.entries.size, revoked: this.revoked.size + this.pushedRevoked.size, pendingSummaries: this.summaries.length, checkoutSets: this.pushedByCheckout.size };
  }

  private pushedOf(checkoutId: string): { ids: Set<ChunkId>; expiresAt: number } {
    let p = this.pushedByCheckout.get(checkoutId);
    if (!p) this.pushedByCheckout.set(checkoutId, (p = { ids: new Set(), expiresAt: 0 }));
    return p;
  }

  private maybeSweep(): void {
    if (this.now() - this.lastSweep >= 1000) this.sweep();
  }

  private evict(jobId: string, reason: JobSummary['reason']): void {
    const e = this.entries.get(jobId);
    if (!e) return;
    this.entries.delete(jobId);
    this.onEvict(jobId);
    const c = e.counters;
    if (c.bytesIn + c.bytesOut + c.chunksIn + c.chunksOut === 0) return;
    if (this.summaries.length >= MAX_PENDING_SUMMARIES) {
      this.summaries.shift();
      this.droppedSummaries++;
    }
    this.summaries.push({
      jobId, checkoutId: e.ticket.checkoutId, desktopId: e.ticket.desktopId, direction: e.ticket.direction, ...c,
      firstAt: new Date(e.firstAt).toISOString(), lastAt: new Date(e.lastAt).toISOString(), reason,
    });
  }

  private async load(t: TicketPayload): Promise<Scope> {
    const chunksOf = async (digests: string[]) => {
      const out = new Set<ChunkId>();
      for (const digest of digests) {
        const raw = await this.store.getManifest(digest);
        if (!raw) throw new CarryonError('unknown-manifest', `manifest ${digest} is not in this transfer server's store`);
        let ids;
        try {
          ids = referencedChunks(decodeManifest(raw));
        } catch (err) {
          throw new CarryonError('store-corrupt', `stored manifest ${digest} does not decode: ${(err as Error).message}`);
        }
        for (const id of ids) out.add(id);
      }
      return out;
    };
    const allowed = await chunksOf(t.manifests);
    // A download's base is what it serves; so is an upload's whose chunks this server names (its manifests are the checkpoint's).
    const same = t.direction === 'download' || (t.baseManifests ?? []).join(',') === t.manifests.join(',');
    const base = same ? allowed : await chunksOf(t.baseManifests ?? []);
    return { allowed, base, pushed: t.direction === 'upload' ? this.pushedOf(t.checkoutId).ids : new Set(), keys: unwrapLineageKeys(this.masterKey, Buffer.from(t.wrappedKeys, 'base64'), t.keyContext) };
  }
}
