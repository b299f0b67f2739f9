import type { KeyObject } from 'node:crypto';
import { request, type Agent } from 'undici';
import { z } from 'zod';
import { signDeviceRequest } from '../core/device-auth.js';
import { CarryonError } from '../core/errors.js';
import { SignedLease } from '../core/lease.js';
import { pinnedAgent } from '../net/pinned-agent.js';

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
  transfer: z.object({ url: z.string(), fingerprint: z.string(), ticket: z.string(), ticketExpiresAt: z.string(), maxStreams: z.number() }).optional(),
});
export type JobView = z.infer<typeof JobView>;

export const CheckoutView = z.object({ id: z.string(), desktopId: z.string(), state: z.string(), snapshotId: z.string(), leaseExpiresAt: z.string() }).loose();

export const CheckoutResponse = z.object({
  checkout: CheckoutView,
  lease: SignedLease,
  keys: z.string(),
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

/** The broker's API as the laptop uses it, over a pinned TLS connection. */
export class BrokerClient {
  private readonly agent: Agent;
  token: string | null = null;

  constructor(readonly url: string, fingerprint: string) {
    this.agent = pinnedAgent(fingerprint, { connections: 4 });
  }

  async call<T>(method: 'GET' | 'POST' | 'PUT' | 'PATCH' | 'DELETE', path: string, body: unknown, schema: z.ZodType<T>, headers: Record<string, string> = {}): Promise<T> {
    const text = body === undefined ? undefined : JSON.stringify(body);
    let res;
    try {
      res = await request(`${this.url}${path}`, {
        method,
        dispatcher: this.agent,
        headers: { ...(text ? { 'content-type': 'application/json' } : {}), ...(this.token ? { authorization: `Bearer ${this.token}` } : {}), ...headers },
        body: text,
      });
    } catch (err) {
      if (err instanceof CarryonError) throw err;
      throw new CarryonError('offline', `cannot reach the broker at ${this.url}: ${(err as Error).message}`);
    }
    const raw = await res.body.text();
    let json: Record<string, unknown> = {};
    try {
      json = raw ? (JSON.parse(raw) as Record<string, unknown>) : {};
    } catch {
      throw new BrokerError(res.statusCode, 'bad-response', `broker answered ${res.statusCode} with non-JSON`, {});
    }
    if (res.statusCode >= 400) throw new BrokerError(res.statusCode, String(json.error ?? 'error'), String(json.message ?? `HTTP ${res.statusCode}`), json);
    const parsed = schema.safeParse(json);
    if (!parsed.success) throw new BrokerError(res.statusCode, 'bad-response', `unexpected broker response to ${path}: ${parsed.error.issues[0]?.message}`, json);
    return parsed.data;
  }

  /** Agent calls: signed by the device key, no user token. */
  signedPost<T>(path: string, body: unknown, device: { id: string; key: KeyObject }, schema: z.ZodType<T>): Promise<T> {
    const text = JSON.stringify(body);
    const saved = this.token;
    this.token = null;
    try {
      return this.call('POST', path, body, schema, signDeviceRequest(device.key, device.id, 'POST', path, text));
    } finally {
      this.token = saved;
    }
  }

  async login(username: string, password: string, deviceId?: string) {
    const r = await this.call('POST', '/v1/auth/login', { username, password, deviceId }, z.object({ token: z.string(), expiresAt: z.string(), user: z.object({ name: z.string(), role: z.string() }).loose(), lease: SignedLease.optional() }));
    this.token = r.token;
    return r;
  }

  close(): Promise<void> {
    return this.agent.close();
  }
}
