import { randomUUID, type KeyObject } from 'node:crypto';
import { signTicket } from '../../core/tokens/ticket.js';
import { transferRoute, type GatewaySettings } from '../gateway/routes.js';
import { assignJobs, orderQueue } from './assign.js';
import type { JobRow, SchedulerStore, ServerRow } from './scheduler-store.js';
import type { JobKind, JobState, JobRequest, JobView, TransferScheduler } from './types.js';

export interface SchedulerOptions {
  signingKey: KeyObject;
  ticketTtlSec?: number;
  pauseGraceSec?: number;
  heartbeatSec?: number;
  maxStreams?: number;
  now?: () => Date;
  /**
   * Called after jobs end (finish, cancel), awaited: the transfer servers learn the revocations
   * before the caller answers (the embedded one in process, standalone ones pushed to).
   */
  onJobsEnded?: () => Promise<void> | void;
  /**
   * The gateway now (read at each ticket: the broker's settings are the one truth); set, tickets
   * given to laptops name the gateway and the server's SNI name, not the server's own URL.
   */
  gateway?: () => GatewaySettings | undefined;
}

/**
 * Who a job view is for: `public` (laptops: through the gateway when there is one) or
 * `internal` (desktop hosts in the datacenter, which reach the transfer servers directly).
 */
export type Audience = 'public' | 'internal';

export interface ServerOverview { id: string; url: string; slots: number; inUse: number; alive: boolean; rateIn: number; rateOut: number; bytesIn: number; bytesOut: number }

/**
 * Transfer-slot scheduler. The database is the truth (a broker restart loses nothing, and brokers
 * sharing a PostgreSQL database share servers, slots and queue); every call first sweeps (dead
 * servers, expired tickets, long pauses), then fills free slots.
 */
export class Scheduler implements TransferScheduler {
  private readonly ttl: number;
  private readonly grace: number;
  private readonly heartbeat: number;
  private readonly maxStreams: number;
  private readonly now: () => Date;

  constructor(private readonly store: SchedulerStore, private readonly opts: SchedulerOptions) {
    this.ttl = opts.ticketTtlSec ?? 600;
    this.grace = opts.pauseGraceSec ?? 300;
    this.heartbeat = opts.heartbeatSec ?? 5;
    this.maxStreams = opts.maxStreams ?? 4;
    this.now = opts.now ?? (() => new Date());
  }

  async registerServer(s: { id: string; url: string; fingerprint: string; slots: number }): Promise<void> {
    await this.store.upsertServer(s, this.iso());
    await this.pump();
  }

  /**
   * A server going away cleanly (the broker's embedded one at close): its jobs are handed to live
   * servers at once, instead of after three missed heartbeats (on PostgreSQL a restarted broker's
   * embedded server has a new id, so the old registration would keep taking jobs until then).
   */
  async retireServer(id: string): Promise<void> {
    await this.store.retireServer(id);
  }

  async serverHeartbeat(id: string, stats: { bytesIn: number; bytesOut: number }): Promise<boolean> {
    const cur = await this.store.server(id);
    if (!cur) return false;
    const dt = Math.max(0.001, (this.now().getTime() - Date.parse(cur.last_heartbeat)) / 1000);
    await this.store.serverStats(id, this.iso(), {
      bytesIn: stats.bytesIn, bytesOut: stats.bytesOut, rateIn: Math.max(0, (stats.bytesIn - cur.bytes_in) / dt), rateOut: Math.max(0, (stats.bytesOut - cur.bytes_out) / dt),
    });
    await this.pump();
    return true;
  }

  async enqueue(req: JobRequest, audience: Audience = 'public'): Promise<JobView> {
    const id = randomUUID();
    await this.store.insertJob(id, req, this.iso());
    await this.pump();
    return (await this.get(id, audience))!;
  }

  async get(jobId: string, audience: Audience = 'public'): Promise<JobView | null> {
    const first = await this.store.job(jobId);
    if (!first) return null;
    // The client came back after its ticket lapsed: it queues again and resumes where it was.
    if (first.state === 'expired') await this.store.requeueExpired(jobId);
    await this.pump();
    if ((await this.store.job(jobId))!.state === 'active') await this.store.renewTicket(jobId, this.isoIn(this.ttl));
    return this.view((await this.store.job(jobId))!, true, undefined, audience);
  }

  async pause(jobId: string): Promise<JobView | null> {
    await this.store.pause(jobId, this.iso());
    return this.get(jobId);
  }

  async resume(jobId: string): Promise<JobView | null> {
    await this.store.resume(jobId);
    return this.get(jobId);
  }

  async finish(jobId: string, outcome: 'done' | 'cancelled' | 'failed'): Promise<void> {
    const n = await this.store.end(jobId, outcome, this.iso());
    await this.pump();
    if (n) await this.jobsEnded();
  }

  async finishForCheckout(checkoutId: string, outcome: 'cancelled' | 'failed'): Promise<void> {
    const n = await this.store.endForCheckout(checkoutId, outcome, this.iso());
    await this.pump();
    if (n) await this.jobsEnded();
  }

  /** Transfer servers alive now, with the pinned fingerprint each registered (revocations are pushed to them). */
  async liveServers(): Promise<{ id: string; url: string; fingerprint: string }[]> {
    return (await this.store.servers()).filter((s) => this.alive(s)).map((s) => ({ id: s.id, url: s.url, fingerprint: s.fingerprint }));
  }

  /** Every registered server, alive or not (what the gateway routes to; haproxy checks health itself). */
  async registeredServers(): Promise<{ id: string; url: string; fingerprint: string }[]> {
    return (await this.store.servers()).map((s) => ({ id: s.id, url: s.url, fingerprint: s.fingerprint }));
  }

  /** The server set the last gateway config was made for (its hash), recorded when it is made. */
  gatewayConfigMade(hash: string): Promise<void> {
    return this.store.gatewayConfigMade(hash, this.iso());
  }
  gatewayConfig(): Promise<{ hash: string; madeAt: string } | null> {
    return this.store.gatewayConfig();
  }

  private async jobsEnded(): Promise<void> {
    try {
      await this.opts.onJobsEnded?.();
    } catch {
      // Telling the servers is best effort: their heartbeat brings the same list.
    }
  }

  /** The checkout a job belongs to (for the holder check), or null. */
  async checkoutOf(jobId: string): Promise<string | null> {
    return (await this.store.job(jobId))?.checkout_id ?? null;
  }

  /**
   * Jobs whose tickets must stop working before they expire: every job that ended within one
   * ticket lifetime (older ones' tickets have expired anyway). Transfer servers get this list.
   */
  revokedJobIds(): Promise<string[]> {
    return this.store.endedSince(this.isoIn(-this.ttl - 60));
  }

  /** Servers, slots in use, queue and throughput for `carryon admin transfers`. */
  /** Every job with where and when it ran, oldest first. */
  history(): ReturnType<SchedulerStore['history']> {
    return this.store.history();
  }

  async overview(): Promise<{ servers: ServerOverview[]; queued: JobView[]; active: JobView[] }> {
    await this.pump();
    const servers: ServerOverview[] = [];
    for (const s of await this.store.servers()) {
      servers.push({ id: s.id, url: s.url, slots: s.slots, inUse: await this.store.inUse(s.id), alive: this.alive(s), rateIn: s.rate_in, rateOut: s.rate_out, bytesIn: s.bytes_in, bytesOut: s.bytes_out });
    }
    const rows = await this.store.openJobs(false);
    const queue = orderQueue(await this.store.queue());
    const views = async (list: JobRow[]) => Promise.all(list.map((r) => this.view(r, false, queue)));
    return {
      servers,
      queued: await views(orderQueue(rows.filter((r) => r.state === 'queued'))),
      active: await views(rows.filter((r) => r.state !== 'queued')),
    };
  }

  /** Unfinished jobs with what they belong to (for the admin views). */
  async openJobs(): Promise<{ id: string; kind: JobKind; state: JobState; checkoutId: string; desktopId: string; serverId: string | null; manifests: string[]; queuedAt: string }[]> {
    return (await this.store.openJobs(true)).map((r) => ({
      id: r.id, kind: r.kind, state: r.state, checkoutId: r.checkout_id, desktopId: r.desktop_id, serverId: r.server_id, manifests: JSON.parse(r.manifests) as string[], queuedAt: r.queued_at,
    }));
  }

  /** Sweeps and assigns, atomically. Called on every scheduler operation. */
  pump(): Promise<void> {
    return this.store.sweepAndAssign(
      () => ({ now: this.iso(), aliveSince: this.isoIn(-3 * this.heartbeat), pausedBefore: this.isoIn(-this.grace), ticketUntil: this.isoIn(this.ttl) }),
      assignJobs,
    );
  }

  private async view(row: JobRow, withTicket = true, queue?: { id: string; kind: JobKind; seq: number }[], audience: Audience = 'public'): Promise<JobView> {
    const view: JobView = { id: row.id, kind: row.kind, state: row.state };
    if (row.state === 'queued') {
      const q = queue ?? orderQueue(await this.store.queue());
      view.queuePosition = q.findIndex((x) => x.id === row.id) + 1;
    }
    if (withTicket && (row.state === 'active' || row.state === 'paused') && row.server_id) {
      const server = (await this.store.server(row.server_id))!;
      const expiresAt = row.ticket_expires_at ?? this.isoIn(this.ttl);
      const ticket = signTicket({
        v: 1, jobId: row.id, desktopId: row.desktop_id, checkoutId: row.checkout_id,
        direction: row.kind === 'checkout' ? 'download' : 'upload', manifests: JSON.parse(row.manifests) as string[],
        ...(row.base_manifests ? { baseManifests: JSON.parse(row.base_manifests) as string[] } : {}),
        wrappedKeys: row.wrapped_keys, keyContext: row.key_context, transferServerId: server.id, maxStreams: this.maxStreams,
        ...(row.background ? { background: true as const } : {}), expiresAt,
      }, this.opts.signingKey);
      // Through the gateway: its address and the server's name; the pin stays the server's own certificate.
      const gateway = audience === 'public' ? this.opts.gateway?.() : undefined;
      const where = gateway ? transferRoute(gateway, server) : { url: server.url, fingerprint: server.fingerprint };
      view.transfer = { ...where, ticket, ticketExpiresAt: expiresAt, maxStreams: this.maxStreams };
    }
    return view;
  }

  private alive(s: ServerRow): boolean {
    return this.now().getTime() - Date.parse(s.last_heartbeat) <= 3 * this.heartbeat * 1000;
  }
  private iso(): string {
    return this.now().toISOString();
  }
  private isoIn(sec: number): string {
    return new Date(this.now().getTime() + sec * 1000).toISOString();
  }
}
