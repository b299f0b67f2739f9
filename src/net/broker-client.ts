import type { KeyObject } from 'node:crypto';
import { request, type Agent } from 'undici';
import { z } from 'zod';
import { signDeviceRequest } from '../core/tokens/device-auth.js';
import { CarryonError } from '../core/errors.js';
import { SignedLease } from '../core/tokens/lease.js';
import { classifyGatewayAnswer, classifyNetworkError, BrokerUnreachable, type AttemptFailure } from './failover.js';
import { pinnedAgent, PinMismatchError } from './pinned-agent.js';

export class BrokerError extends CarryonError {
  constructor(readonly status: number, code: string, message: string, readonly body: Record<string, unknown>) {
    super(code, message);
  }
}

export const JobView = z.object({
  id: z.string(),
  kind: z.enum(['checkout', 'checkin', 'replicate']),
  state: z.enum(['queued', 'active', 'paused', 'done', 'cancelled', 'failed', 'expired']),
  queuePosition: z.number().optional(),
  transfer: z.object({ url: z.string(), fingerprint: z.string(), servername: z.string().optional(), ticket: z.string(), ticketExpiresAt: z.string(), maxStreams: z.number() }).optional(),
});
export type JobView = z.infer<typeof JobView>;

/**
 * Asks with fields only a newer broker reads (`extra`; null: none); one from before them refuses
 * the body (400: its schemas are strict), and is asked again without them rather than failing.
 */
export async function askWithNewerFields<T>(ask: (body: object) => Promise<T>, base: object, extra: object | null): Promise<T> {
  if (!extra) return ask(base);
  try {
    return await ask({ ...base, ...extra });
  } catch (err) {
    if (err instanceof BrokerError && err.status === 400) return ask(base);
    throw err;
  }
}

export const CheckoutView = z.object({ id: z.string(), desktopId: z.string(), state: z.string(), snapshotId: z.string(), leaseExpiresAt: z.string() }).loose();

export const CheckoutResponse = z.object({
  checkout: CheckoutView,
  lease: SignedLease,
  keys: z.string(),
  /** The check-out's online unlock share (client/vault/online-unlock.ts); older brokers send none. */
  unlock: z.string().optional(),
  /** The share that opens the laptop's parked copy's online wrap, when it asked with parkedFrom (client/vault/parked.ts). */
  parkUnlock: z.string().optional(),
  config: z.object({ vcpus: z.number(), ramMiB: z.number(), usb: z.boolean(), nic: z.string(), disks: z.array(z.object({ name: z.string(), sizeBytes: z.number() })) }).loose(),
  policy: z.record(z.string(), z.object({ value: z.unknown(), source: z.string() })),
  disks: z.array(z.object({ name: z.string(), digest: z.string(), manifest: z.string() })),
  job: JobView,
});
export type CheckoutResponse = z.infer<typeof CheckoutResponse>;

export const DesktopEntry = z.object({
  id: z.string(),
  name: z.string(),
  state: z.string(),
  actions: z.array(z.string()),
  checkout: CheckoutView.optional(),
  policy: z.record(z.string(), z.object({ value: z.unknown(), source: z.string() })),
}).loose();

export interface BrokerEndpoint {
  url: string;
  fingerprint: string;
  /** Through a gateway (`url` is the gateway's): the SNI name routed to the broker. */
  servername?: string;
}

export interface CallOptions {
  /**
   * `true`: the request may be sent again to the next broker even when it may have reached one
   * already (the caller says why that is safe: a read, or a step the broker's state machine
   * accepts twice with the same effect). Default: true for GET, false otherwise, and then the
   * next broker is tried only when the request provably never left.
   */
  repeatable?: boolean;
  /** false: send no user token (device-signed agent calls). */
  bearer?: boolean;
}

/**
 * The broker's API as the laptop uses it, over pinned TLS connections. Several brokers of one
 * deployment (sharing one database) may be listed, each with its own pinned certificate: a
 * call goes to the broker that answered last and, when that one cannot be reached, to the next
 * in the list (at most one attempt per broker per call). An answer (2xx, or a broker's own
 * error such as 4xx) is never retried elsewhere; a broker whose certificate is not its pinned
 * one is never used again by this client.
 */
export class BrokerClient {
  private readonly endpoints: { url: string; fingerprint: string; agent: Agent; refused: string | null }[];
  private current = 0;
  token: string | null = null;
  /** Unlock shares a login's answer brought, by check-out (taken once). */
  private readonly unlockShares = new Map<string, string>();

  /**
   * `timeouts`: how long a broker may take to accept the connection (default 10 s) and to
   * answer (default undici's 300 s: a check-out may wait for a datacenter VM to power down).
   */
  constructor(urlOrList: string | readonly BrokerEndpoint[], fingerprint = '', private readonly log: (line: string) => void = () => undefined, timeouts: { connectMs?: number; answerMs?: number } = {}) {
    const list = typeof urlOrList === 'string' ? [{ url: urlOrList, fingerprint }] : urlOrList;
    if (list.length === 0) throw new CarryonError('invalid', 'no broker URL given');
    this.endpoints = list.map((e) => ({ url: e.url.replace(/\/$/, ''), fingerprint: e.fingerprint, agent: pinnedAgent(e.fingerprint, { connections: 4, connectTimeoutMs: timeouts.connectMs, answerTimeoutMs: timeouts.answerMs, ...(e.servername ? { servername: e.servername } : {}) }), refused: null }));
  }

  /** The broker that answered last (the first of the list until one has). */
  get url(): string {
    return this.endpoints[this.current]!.url;
  }

  /** The pinned certificate of that broker. */
  get fingerprint(): string {
    return this.endpoints[this.current]!.fingerprint;
  }

  async call<T>(method: 'GET' | 'POST' | 'PUT' | 'PATCH' | 'DELETE', path: string, body: unknown, schema: z.ZodType<T>, headers: Record<string, string> = {}, opts: CallOptions = {}): Promise<T> {
    const text = body === undefined ? undefined : JSON.stringify(body);
    const repeatable = opts.repeatable ?? method === 'GET';
    const failures: string[] = [];
    let maybeApplied = false;
    let pinMismatch = false;
    // One attempt per broker, starting with the one that answered last.
    for (let i = 0; i < this.endpoints.length; i++) {
      const index = (this.current + i) % this.endpoints.length;
      const ep = this.endpoints[index]!;
      if (ep.refused) {
        failures.push(`${ep.url}: ${ep.refused}`);
        pinMismatch = true;
        continue;
      }
      const attempt = await this.attempt(ep, method, path, text, { ...(this.token && opts.bearer !== false ? { authorization: `Bearer ${this.token}` } : {}), ...headers });
      if ('answer' in attempt) {
        this.current = index;
        return this.parse(attempt.answer.status, attempt.answer.raw, path, schema);
      }
      failures.push(`${ep.url}: ${attempt.reason}`);
      if (attempt.pin) {
        pinMismatch = true;
        ep.refused = attempt.reason;
        this.log(`broker ${ep.url} presents a certificate other than its pinned one: not used (${attempt.reason})`);
      }
      if (attempt.failure === 'maybe-applied') {
        maybeApplied = true;
        if (!repeatable) {
          // The broker that lost an answer is suspect: whatever the caller sends next starts after it.
          if (this.endpoints.length > 1) this.current = (index + 1) % this.endpoints.length;
          break;
        }
      }
      if (!attempt.pin && i + 1 < this.endpoints.length) this.log(`broker ${ep.url} did not answer (${attempt.reason}); trying the next one`);
    }
    const where = this.endpoints.length === 1 ? `the broker at ${this.endpoints[0]!.url}` : `any of the ${this.endpoints.length} brokers`;
    const code = pinMismatch && !maybeApplied ? 'pin-mismatch' : 'offline';
    const applied = maybeApplied ? ` (${method} ${path} was sent and may have been applied)` : '';
    throw new BrokerUnreachable(code, `cannot reach ${where}${applied}: ${failures.join('; ')}`, maybeApplied);
  }

  private async attempt(ep: { url: string; agent: Agent }, method: string, path: string, text: string | undefined, headers: Record<string, string>):
    Promise<{ answer: { status: number; raw: string } } | { failure: AttemptFailure; reason: string; pin: boolean }> {
    try {
      const res = await request(`${ep.url}${path}`, {
        method: method as 'GET',
        dispatcher: ep.agent,
        headers: { ...(text ? { 'content-type': 'application/json' } : {}), ...headers },
        body: text,
      });
      const raw = await res.body.text();
      const gateway = res.statusCode >= 500 ? classifyGatewayAnswer(res.statusCode, jsonOrNull(raw)) : null;
      if (gateway) return { failure: gateway, reason: `HTTP ${res.statusCode} from a gateway`, pin: false };
      return { answer: { status: res.statusCode, raw } };
    } catch (err) {
      return { failure: classifyNetworkError(err), reason: (err as Error).message, pin: err instanceof PinMismatchError };
    }
  }

  private parse<T>(status: number, raw: string, path: string, schema: z.ZodType<T>): T {
    const json = jsonOrNull(raw);
    if (json === null) throw new BrokerError(status, 'bad-response', `broker answered ${status} with non-JSON`, {});
    if (status >= 400) throw new BrokerError(status, String(json.error ?? 'error'), String(json.message ?? `HTTP ${status}`), json);
    const parsed = schema.safeParse(json);
    if (!parsed.success) throw new BrokerError(status, 'bad-response', `unexpected broker response to ${path}: ${parsed.error.issues[0]?.message}`, json);
    return parsed.data;
  }

  /** Agent calls: signed by the device key, no user token. */
  signedPost<T>(path: string, body: unknown, device: { id: string; key: KeyObject }, schema: z.ZodType<T>): Promise<T> {
    // Not repeated after it may have arrived: the broker accepts each signed nonce once.
    return this.call('POST', path, body, schema, signDeviceRequest(device.key, device.id, 'POST', path, JSON.stringify(body)), { bearer: false });
  }

  /**
   * A device-signed GET whose body is a byte stream (a release bundle, by range): from the broker
   * that answered last only; the caller tries again later (it keeps what arrived).
   */
  async signedDownload(path: string, device: { id: string; key: KeyObject }, headers: Record<string, string>): Promise<{ status: number; headers: Record<string, unknown>; body: AsyncIterable<Buffer> & { text(): Promise<string> } }> {
    const ep = this.endpoints[this.current]!;
    const res = await request(`${ep.url}${path}`, { method: 'GET', dispatcher: ep.agent, headers: { ...headers, ...signDeviceRequest(device.key, device.id, 'GET', path, '') } });
    return { status: res.statusCode, headers: res.headers, body: res.body };
  }

  /**
   * `unlock`: the check-out whose online unlock share the caller needs next (the broker gives it
   * with the answer; `takeUnlockShare`). A broker older than that field refuses it before it
   * checks the password (400): asked again without it.
   */
  async login(username: string, password: string, deviceId?: string, unlock?: string) {
    const Answer = z.object({ token: z.string(), expiresAt: z.string(), user: z.object({ name: z.string(), role: z.string() }).loose(), lease: SignedLease.optional(), unlock: z.object({ checkoutId: z.string(), share: z.string().max(100) }).optional() });
    // Repeatable: a login only issues a token (and a lease); a second one supersedes nothing.
    const ask = (withUnlock: boolean) => this.call('POST', '/v1/auth/login', { username, password, deviceId, ...(withUnlock ? { unlock } : {}) }, Answer, {}, { repeatable: true });
    let r;
    try {
      r = await ask(unlock !== undefined);
    } catch (err) {
      if (unlock === undefined || !(err instanceof BrokerError) || err.status !== 400 || !err.message.includes('unlock')) throw err;
      r = await ask(false);
    }
    this.token = r.token;
    if (r.unlock) this.unlockShares.set(r.unlock.checkoutId, r.unlock.share);
    return r;
  }

  /** The unlock share the login's answer brought for `checkoutId` (once), or null. */
  takeUnlockShare(checkoutId: string): string | null {
    const share = this.unlockShares.get(checkoutId) ?? null;
    this.unlockShares.delete(checkoutId);
    return share;
  }

  async close(): Promise<void> {
    await Promise.all(this.endpoints.map((e) => e.agent.close()));
  }
}

function jsonOrNull(raw: string): Record<string, unknown> | null {
  if (!raw) return {};
  try {
    const v: unknown = JSON.parse(raw);
    return v && typeof v === 'object' && !Array.isArray(v) ? (v as Record<string, unknown>) : null;
  } catch {
    return null;
  }
}
