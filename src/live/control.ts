import { randomBytes } from 'node:crypto';
import { chmod, rm } from 'node:fs/promises';
import { connect, createServer, type Server, type Socket } from 'node:net';
import { z } from 'zod';
import { CarryonError } from '../core/errors.js';
import type { FrozenPoint } from './live-chain.js';

/**
 * The control socket of the process that holds a running chain (`carryon run` / `serve`): the
 * one way another process (`carryon replicate`, `checkin`, the agent) takes a live replica or
 * asks the desktop to shut down. A unix socket in the desktop's private 0700 directory, one JSON
 * request per line, one answer per request. Each request is MACed under a key only an unlocked
 * vault yields, over the connection's random challenge and the request's sequence number: another
 * process of the same user without the desktop's password cannot freeze, fold (and so set what
 * the MACed state says the base holds) or shut the desktop down, nor replay a request. A connection that goes away with a point still open
 * abandons it: a sender killed mid-replica never leaves the chain with a layer too many.
 */

const Hex64 = z.string().regex(/^[0-9a-f]{64}$/);
const Hex4 = z.string().regex(/^[0-9a-f]{4}$/);
/** What `carryon power` may ask of a running desktop. */
export const POWER_ACTIONS = ['powerdown', 'reset', 'suspend', 'resume'] as const;
export type PowerAction = (typeof POWER_ACTIONS)[number];
const PointId = z.string().regex(/^[0-9a-f]{16}$/);
const Request = z.discriminatedUnion('op', [
  z.object({ op: z.literal('freeze'), background: z.boolean().optional() }).strict(),
  z.object({ op: z.literal('fold'), id: PointId, digests: z.record(z.string().regex(/^[A-Za-z0-9._-]{1,64}$/), Hex64), background: z.boolean().optional() }).strict(),
  z.object({ op: z.literal('abandon'), id: PointId }).strict(),
  z.object({ op: z.literal('shutdown'), graceMs: z.number().int().min(0).max(3_600_000), force: z.boolean() }).strict(),
  z.object({ op: z.literal('status') }).strict(),
  z.object({ op: z.enum(['usb-attach', 'usb-detach']), vendorId: Hex4, productId: Hex4 }).strict(),
  z.object({ op: z.literal('usb-list') }).strict(),
  z.object({ op: z.literal('power'), action: z.enum(POWER_ACTIONS) }).strict(),
]);
export type ControlRequest = z.infer<typeof Request>;
const Signed = z.object({ req: z.string().max(60_000), mac: z.string().regex(/^[0-9a-f]{64}$/) }).strict();

/** MACs (and checks) a control request: the same key on both sides, from the unlocked vault. */
export interface ControlKey {
  sign(data: string): string;
  verify(data: string, mac: string): boolean;
}

/** What is MACed: the connection's challenge, the request's place in it, the request. */
const macInput = (challenge: string, seq: number, req: string) => `${challenge}:${seq}:${req}`;

/** What the holder answers `status` with. */
export interface HolderStatus {
  kind: 'run' | 'serve';
  pid: number;
  /** Whether the guest's agent answers (quiesced replicas); null where there is no guest (`serve`). */
  guestAgent: boolean | null;
  pointOpen: boolean;
}

export interface ControlHandler {
  /** `background`: a background replica's, which waits behind a background fold instead of hurrying it. */
  freeze(opts?: { background?: boolean }): Promise<FrozenPoint>;
  /** `background`: the fold yields to the guest's I/O (a speed limit) until someone waits on the chain. */
  fold(id: string, digests: ReadonlyMap<string, string>, opts?: { background?: boolean }): Promise<void>;
  abandon(id: string): Promise<void>;
  /** Asks the guest to power off (ACPI), waits up to `graceMs`; `force` then cuts the power. Resolves once it is off. */
  shutdown(graceMs: number, force: boolean): Promise<void>;
  status(): Promise<HolderStatus>;
  /** USB hot-plug into the running VM (absent where nothing runs a guest: `serve`). */
  usb?: {
    attach(vendorId: string, productId: string): Promise<AttachedUsbView>;
    detach(vendorId: string, productId: string): Promise<AttachedUsbView>;
    list(): Promise<AttachedUsbView[]>;
  };
  /** A power event for the guest; answers what was done, in words. */
  power?(action: PowerAction): Promise<string>;
}

/** An attached USB device as the control socket reports it. */
export interface AttachedUsbView {
  id: string;
  vendorId: string;
  productId: string;
  name?: string;
  at: string;
}

const noGuest = () => new CarryonError('no-guest', 'this desktop is served (`carryon serve`), not run: there is no guest to attach a device to or to power');

/** Longest request line accepted (a fold's digests for many disks fit easily). */
const MAX_LINE = 64 * 1024;

/**
 * How long a check-in's or an interactive replica's freeze waits for a background replica in flight
 * to give way (its sender puts its point back and ends) before it is refused.
 */
export const GIVE_WAY_WAIT_MS = 60_000;

export async function serveControl(socketPath: string, handler: ControlHandler, key: ControlKey, log: (l: string) => void, opts: { giveWayWaitMs?: number } = {}): Promise<{ close(): Promise<void> }> {
  await rm(socketPath, { force: true });
  const sockets = new Set<Socket>();
  // Background points open now, each with how to ask its sender to give way (once).
  const background = new Map<string, () => void>();
  const giveWayWaitMs = opts.giveWayWaitMs ?? GIVE_WAY_WAIT_MS;
  /**
   * A user's freeze (check-in, interactive replica) never fails on the agent's scheduled replica: that
   * replica's sender is asked to give way (it stops sending and puts its point back: the normal
   * failure path, so it never reads a layer being changed under it), and the freeze is taken once
   * the point is gone. A background replica runs at the idle CPU class and can take long beside a
   * busy guest; the user waits seconds, not for its end. Another user's point is refused as before.
   */
  const freezeGivingWay = async (): Promise<FrozenPoint> => {
    const deadline = Date.now() + giveWayWaitMs;
    let told = false;
    for (;;) {
      try {
        return await handler.freeze({ background: false });
      } catch (err) {
        if (!(err instanceof CarryonError && err.code === 'replica-busy') || background.size === 0) throw err;
        if (!told) log('a background replica is in flight: asking its sender to give way');
        told = true;
        for (const giveWay of background.values()) giveWay();
        if (Date.now() >= deadline) throw new CarryonError('replica-busy', `a background replica of this desktop is being taken and did not give way within ${Math.round(giveWayWaitMs / 1000)} s: run the same command again in a minute`);
        await new Promise((r) => setTimeout(r, 100));
      }
    }
  };
  const server: Server = createServer((sock) => {
    sockets.add(sock);
    const open = new Set<string>();
    const challenge = randomBytes(16).toString('hex');
    let seq = 0;
    let buf = '';
    let queue: Promise<void> = Promise.resolve();
    const answer = (body: Record<string, unknown>) => void (sock.writable && sock.write(`${JSON.stringify(body)}\n`));
    const handle = async (line: string) => {
      let req: ControlRequest;
      try {
        const signed = Signed.parse(JSON.parse(line));
        if (!key.verify(macInput(challenge, seq++, signed.req), signed.mac)) {
          log('a control request without a valid MAC was refused (a process without the desktop\'s keys)');
          answer({ ok: false, error: 'forbidden', message: 'the control request is not signed with this desktop\'s keys' });
          return void sock.destroy();
        }
        req = Request.parse(JSON.parse(signed.req));
      } catch (err) {
        return answer({ ok: false, error: 'invalid', message: `not a control request: ${(err as Error).message.slice(0, 200)}` });
      }
      try {
        if (req.op === 'freeze') {
          const point = req.background === true ? await handler.freeze({ background: true }) : await freezeGivingWay();
          open.add(point.id);
          if (req.background === true) {
            let asked = false;
            background.set(point.id, () => {
              if (!asked) answer({ event: 'give-way', id: point.id });
              asked = true;
            });
          }
          return answer({ ok: true, point });
        }
        if (req.op === 'fold') {
          // Acknowledged by the broker: the fold goes on (a freeze waiting behind it hurries it).
          background.delete(req.id);
          open.delete(req.id);
          await handler.fold(req.id, new Map(Object.entries(req.digests)), { background: req.background === true });
          return answer({ ok: true });
        }
        if (req.op === 'abandon') {
          open.delete(req.id);
          await handler.abandon(req.id);
          background.delete(req.id);
          return answer({ ok: true });
        }
        if (req.op === 'shutdown') {
          await handler.shutdown(req.graceMs, req.force);
          return answer({ ok: true });
        }
        if (req.op === 'usb-attach' || req.op === 'usb-detach') {
          if (!handler.usb) throw noGuest();
          const device = req.op === 'usb-attach' ? await handler.usb.attach(req.vendorId, req.productId) : await handler.usb.detach(req.vendorId, req.productId);
          return answer({ ok: true, device });
        }
        if (req.op === 'usb-list') {
          if (!handler.usb) throw noGuest();
          return answer({ ok: true, devices: await handler.usb.list() });
        }
        if (req.op === 'power') {
          if (!handler.power) throw noGuest();
          return answer({ ok: true, done: await handler.power(req.action) });
        }
        return answer({ ok: true, status: await handler.status() });
      } catch (err) {
        const code = err instanceof CarryonError ? err.code : 'failed';
        return answer({ ok: false, error: code, message: (err as Error).message });
      }
    };
    sock.setEncoding('utf8');
    sock.write(`${JSON.stringify({ challenge })}\n`);
    sock.on('data', (d: string) => {
      buf += d;
      if (buf.length > MAX_LINE && !buf.includes('\n')) return void sock.destroy();
      let nl;
      while ((nl = buf.indexOf('\n')) >= 0) {
        const line = buf.slice(0, nl);
        buf = buf.slice(nl + 1);
        queue = queue.then(() => handle(line));
      }
    });
    sock.on('error', () => undefined);
    sock.on('close', () => {
      sockets.delete(sock);
      // The sender is gone: whatever it froze and did not settle goes back into the chain.
      void queue.then(async () => {
        for (const id of open) {
          log(`the replica's sender went away: putting its point in time back into the desktop's top layer`);
          await handler.abandon(id).catch((err: unknown) => log(`abandoning replica ${id} failed: ${(err as Error).message}`));
          background.delete(id);
        }
      });
    });
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(socketPath, () => resolve());
  });
  await chmod(socketPath, 0o600);
  return {
    async close() {
      for (const s of sockets) s.destroy();
      await new Promise<void>((r) => server.close(() => r()));
      await rm(socketPath, { force: true });
    },
  };
}

const Answer = z.object({ ok: z.boolean(), error: z.string().optional(), message: z.string().optional() }).loose();
const Range = z.object({ offset: z.number().int().min(0), length: z.number().int().min(1) });
const FrozenPointSchema = z.object({
  id: PointId, kind: z.enum(['quiesced', 'crash-consistent']), reason: z.string().optional(), pausedMs: z.number(), socketPath: z.string(),
  disks: z.array(z.object({ name: z.string(), exportName: z.string(), baseDigest: Hex64, extents: z.array(Range) })),
});
const AttachedSchema = z.object({ id: z.string(), vendorId: Hex4, productId: Hex4, name: z.string().optional(), at: z.string() });
const StatusSchema = z.object({ kind: z.enum(['run', 'serve']), pid: z.number().int(), guestAgent: z.boolean().nullable(), pointOpen: z.boolean() });

/** The sender's side: one connection, requests answered in order. */
export class ControlClient {
  private buf = '';
  private waiting: { resolve: (v: Record<string, unknown>) => void; reject: (e: Error) => void }[] = [];
  private readonly giveWayListeners: ((pointId: string) => void)[] = [];
  private closedErr: Error | null = null;
  private seq = 0;
  private challenge: Promise<string>;

  private constructor(private readonly sock: Socket, private readonly key: ControlKey) {
    this.challenge = new Promise<Record<string, unknown>>((resolve, reject) => this.waiting.push({ resolve, reject })).then((hello) => z.object({ challenge: z.string().regex(/^[0-9a-f]{32}$/) }).parse(hello).challenge);
    this.challenge.catch(() => undefined);
    sock.setEncoding('utf8');
    sock.on('data', (d: string) => {
      this.buf += d;
      let nl;
      while ((nl = this.buf.indexOf('\n')) >= 0) {
        const line = this.buf.slice(0, nl);
        this.buf = this.buf.slice(nl + 1);
        try {
          const msg = JSON.parse(line) as Record<string, unknown>;
          // Not an answer: the holder asks this background replica to give way (serveControl).
          if (msg.event === 'give-way') {
            if (typeof msg.id === 'string') for (const l of this.giveWayListeners) l(msg.id);
            continue;
          }
          this.waiting.shift()?.resolve(msg);
        } catch (err) {
          this.waiting.shift()?.reject(err as Error);
        }
      }
    });
    const gone = (err?: Error) => {
      this.closedErr ??= err ?? new CarryonError('holder-gone', 'the process holding the desktop went away');
      for (const w of this.waiting.splice(0)) w.reject(this.closedErr);
    };
    sock.on('error', gone);
    sock.on('close', () => gone());
  }

  static async connect(socketPath: string, key: ControlKey): Promise<ControlClient> {
    const sock = connect(socketPath);
    await new Promise<void>((resolve, reject) => {
      sock.once('connect', resolve);
      sock.once('error', (err: NodeJS.ErrnoException) => reject(new CarryonError('holder-unreachable', `the process holding the desktop does not answer on ${socketPath} (${err.code ?? err.message}): it may be an older carryon; stop it and try again`)));
    });
    return new ControlClient(sock, key);
  }

  private async call(req: ControlRequest): Promise<Record<string, unknown>> {
    const challenge = await this.challenge;
    if (this.closedErr) throw this.closedErr;
    const reply = new Promise<Record<string, unknown>>((resolve, reject) => this.waiting.push({ resolve, reject }));
    const body = JSON.stringify(req);
    this.sock.write(`${JSON.stringify({ req: body, mac: this.key.sign(macInput(challenge, this.seq++, body)) })}\n`);
    const a = Answer.parse(await reply);
    if (!a.ok) throw new CarryonError(a.error ?? 'failed', a.message ?? 'the holder refused');
    return a;
  }

  /** Called when the holder asks this connection's background point to give way to a user's freeze. */
  onGiveWay(listener: (pointId: string) => void): void {
    this.giveWayListeners.push(listener);
  }

  async freeze(opts: { background?: boolean } = {}): Promise<FrozenPoint> {
    return FrozenPointSchema.parse((await this.call({ op: 'freeze', ...(opts.background ? { background: true } : {}) })).point);
  }

  async fold(id: string, digests: ReadonlyMap<string, string>, opts: { background?: boolean } = {}): Promise<void> {
    await this.call({ op: 'fold', id, digests: Object.fromEntries(digests), ...(opts.background ? { background: true } : {}) });
  }

  async abandon(id: string): Promise<void> {
    await this.call({ op: 'abandon', id });
  }

  async shutdown(graceMs: number, force: boolean): Promise<void> {
    await this.call({ op: 'shutdown', graceMs, force });
  }

  async status(): Promise<HolderStatus> {
    return StatusSchema.parse((await this.call({ op: 'status' })).status);
  }

  async usbAttach(vendorId: string, productId: string): Promise<AttachedUsbView> {
    return AttachedSchema.parse((await this.call({ op: 'usb-attach', vendorId, productId })).device);
  }

  async usbDetach(vendorId: string, productId: string): Promise<AttachedUsbView> {
    return AttachedSchema.parse((await this.call({ op: 'usb-detach', vendorId, productId })).device);
  }

  async usbList(): Promise<AttachedUsbView[]> {
    return z.array(AttachedSchema).parse((await this.call({ op: 'usb-list' })).devices);
  }

  /** Answers what the holder did, in words. */
  async power(action: PowerAction): Promise<string> {
    return z.string().parse((await this.call({ op: 'power', action })).done);
  }

  close(): void {
    this.sock.destroy();
  }
}
