import { randomInt } from 'node:crypto';
import { connect, type Socket } from 'node:net';
import { z } from 'zod';
import { CarryonError } from '../core/errors.js';

/**
 * Client for qemu-guest-agent (QGA) on the host end of the guest's virtio-serial channel.
 *
 * QGA is a line of JSON each way, with no greeting and no request ids: a reply left over from a
 * command the previous client gave up on looks exactly like the answer to ours. So, as QEMU's
 * docs ask, every connection (and every exchange after a timeout) starts with
 * `guest-sync-delimited` and a random id: the agent answers it after a 0xFF byte, which never
 * occurs in JSON, and we discard everything before that byte and every sync answer whose id is
 * not ours. Every call is bounded: a guest with no agent (nothing reads the channel) costs the
 * timeout and no more.
 */

/** The byte QGA writes before the answer to guest-sync-delimited (and reads as "reset parser"). */
export const QGA_SENTINEL = 0xff;
/** Bound on what we buffer while waiting for an answer: a flood is an error, not a heap. */
const MAX_BUFFERED = 1 << 20;

const ErrorReply = z.object({ error: z.object({ class: z.string(), desc: z.string() }) });
const OkReply = z.object({ return: z.unknown() }).refine((m) => 'return' in m, 'no "return"');
/** One answer, as the rest of this file sees it. */
type Reply = { ok: true; value: unknown } | { ok: false; errorClass: string; desc: string };

function parseReply(text: string): Reply | null {
  let raw: unknown;
  try {
    raw = JSON.parse(text);
  } catch {
    return null;
  }
  const err = ErrorReply.safeParse(raw);
  if (err.success) return { ok: false, errorClass: err.data.error.class, desc: err.data.error.desc };
  const ok = OkReply.safeParse(raw);
  return ok.success ? { ok: true, value: ok.data.return } : null;
}
const Count = z.number().int().min(0);
const FsfreezeStatus = z.enum(['thawed', 'frozen']);

/** No answer in time, or no channel at all: the guest runs no agent (or it is stuck). */
export class GuestAgentUnavailable extends CarryonError {
  constructor(message: string) {
    super('guest-agent-unavailable', message);
  }
}

/** The agent answered, with an error (`errorClass`/`desc` as QGA reports them). */
export class GuestAgentError extends CarryonError {
  constructor(
    readonly command: string,
    readonly errorClass: string,
    readonly desc: string,
  ) {
    super('guest-agent-error', `guest agent ${command}: ${desc}`);
  }
}

/** What quiesce and the live replicate need from an agent (a fake one in tests). */
export interface FreezeAgent {
  ping(timeoutMs?: number): Promise<void>;
  /** guest-fsfreeze-freeze: the number of file systems frozen. */
  freeze(timeoutMs?: number): Promise<number>;
  /** guest-fsfreeze-thaw: the number of file systems thawed. */
  thaw(timeoutMs?: number): Promise<number>;
  status(timeoutMs?: number): Promise<'thawed' | 'frozen'>;
}

export const DEFAULT_TIMEOUT_MS = 5_000;

interface Pending {
  /** Waiting for the sentinel, then a sync answer carrying this id; else for the next line. */
  syncId?: number;
  sawSentinel: boolean;
  resolve(msg: Reply): void;
  reject(err: Error): void;
}

export class GuestAgent implements FreezeAgent {
  private buf: Buffer = Buffer.alloc(0);
  private pending: Pending | null = null;
  /** One exchange at a time: QGA answers in order and a late answer must not meet the wrong caller. */
  private queue: Promise<unknown> = Promise.resolve();
  /** Set after a timeout or a bad reply: the next exchange re-syncs first. */
  private needsSync = true;
  private closedErr: Error | null = null;

  private constructor(
    private readonly sock: Socket,
    readonly path: string,
  ) {
    sock.on('data', (d: Buffer) => this.onData(d));
    const gone = (err?: Error) => {
      this.closedErr ??= err ?? new GuestAgentUnavailable(`guest agent channel ${path} closed`);
      this.pending?.reject(this.closedErr);
      this.pending = null;
    };
    sock.on('close', () => gone());
    sock.on('error', (err) => gone(new GuestAgentUnavailable(`guest agent channel ${path}: ${err.message}`)));
  }

  /**
   * Connects to the channel's unix socket and syncs with the agent, all within `timeoutMs`.
   * Throws GuestAgentUnavailable when no socket is there or no agent answers.
   */
  static async connect(path: string, timeoutMs = DEFAULT_TIMEOUT_MS): Promise<GuestAgent> {
    const started = Date.now();
    const sock = connect(path);
    try {
      await bounded(
        new Promise<void>((resolve, reject) => {
          sock.once('connect', resolve);
          sock.once('error', reject);
        }),
        timeoutMs,
        () => new GuestAgentUnavailable(`no guest agent channel at ${path} within ${timeoutMs} ms`),
      );
    } catch (err) {
      sock.destroy();
      if (err instanceof GuestAgentUnavailable) throw err;
      throw new GuestAgentUnavailable(`no guest agent channel at ${path}: ${(err as Error).message}`);
    }
    const agent = new GuestAgent(sock, path);
    try {
      await agent.sync(Math.max(1, timeoutMs - (Date.now() - started)));
    } catch (err) {
      agent.close();
      if (!(err instanceof GuestAgentUnavailable)) throw err;
      // QEMU's channel takes one client at a time: a second one connects, then hears nothing.
      throw new GuestAgentUnavailable(`${err.message}: the guest runs no agent, or it is stuck, or another client holds ${path}`);
    }
    return agent;
  }

  /** `connect`, or null with the reason when no agent answers (what `quiesce` takes: null means crash-consistent). */
  static async tryConnect(path: string, timeoutMs = DEFAULT_TIMEOUT_MS): Promise<{ agent: GuestAgent | null; reason?: string }> {
    try {
      return { agent: await GuestAgent.connect(path, timeoutMs) };
    } catch (err) {
      if (err instanceof GuestAgentUnavailable || err instanceof GuestAgentError) return { agent: null, reason: err.message };
      throw err;
    }
  }

  get closed(): boolean {
    return this.closedErr !== null;
  }

  /** guest-sync-delimited with a fresh random id: afterwards the next line is the next answer. */
  sync(timeoutMs = DEFAULT_TIMEOUT_MS): Promise<void> {
    return this.serial(async () => {
      await this.syncNow(timeoutMs);
    });
  }

  async ping(timeoutMs = DEFAULT_TIMEOUT_MS): Promise<void> {
    await this.call('guest-ping', undefined, timeoutMs);
  }

  async freeze(timeoutMs = DEFAULT_TIMEOUT_MS): Promise<number> {
    return answerOf('guest-fsfreeze-freeze', Count, await this.call('guest-fsfreeze-freeze', undefined, timeoutMs));
  }

  async thaw(timeoutMs = DEFAULT_TIMEOUT_MS): Promise<number> {
    return answerOf('guest-fsfreeze-thaw', Count, await this.call('guest-fsfreeze-thaw', undefined, timeoutMs));
  }

  async status(timeoutMs = DEFAULT_TIMEOUT_MS): Promise<'thawed' | 'frozen'> {
    return answerOf('guest-fsfreeze-status', FsfreezeStatus, await this.call('guest-fsfreeze-status', undefined, timeoutMs));
  }

  /**
   * Asks the guest to power down (or reboot). QGA answers a shutdown it carries out with nothing
   * at all, and an error only when it refuses: so after syncing (within `timeoutMs`: the agent
   * is alive) we send it and wait `errorWindowMs` for an error; silence, or the channel closing,
   * is success. Whether
   * the guest then really powers off is for the caller to watch (QEMU exits).
   */
  shutdown(mode: 'powerdown' | 'reboot', timeoutMs = DEFAULT_TIMEOUT_MS, errorWindowMs = 2_000): Promise<void> {
    return this.silentOnSuccess('guest-shutdown', { mode }, timeoutMs, errorWindowMs);
  }

  /** Sets the guest's clock (after a resume the guest's idea of time is wherever it stopped). */
  async setTime(at: Date, timeoutMs = DEFAULT_TIMEOUT_MS): Promise<void> {
    await this.call('guest-set-time', { time: at.getTime() * 1_000_000 }, timeoutMs);
  }

  /** Commands QGA answers only when they fail: sync first, send, and wait `errorWindowMs` for an error. */
  private silentOnSuccess(command: string, args: Record<string, unknown> | undefined, timeoutMs: number, errorWindowMs: number): Promise<void> {
    return this.serial(async () => {
      // Always sync first: silence is only success from an agent known to be listening.
      await this.syncNow(timeoutMs);
      try {
        const reply = await this.exchange(args ? { execute: command, arguments: args } : { execute: command }, undefined, errorWindowMs);
        if (!reply.ok) throw new GuestAgentError(command, reply.errorClass, reply.desc);
        // An answer here is not in the protocol; the agent's state is unknown now.
        this.needsSync = true;
      } catch (err) {
        if (err instanceof GuestAgentUnavailable) return; // silence or a closed channel: carried out
        throw err;
      }
    });
  }

  close(): void {
    this.sock.destroy();
  }

  private async call(command: string, args: Record<string, unknown> | undefined, timeoutMs: number): Promise<unknown> {
    return this.serial(async () => {
      const started = Date.now();
      if (this.needsSync) await this.syncNow(timeoutMs);
      const reply = await this.exchange(args ? { execute: command, arguments: args } : { execute: command }, undefined, Math.max(1, timeoutMs - (Date.now() - started)));
      if (!reply.ok) throw new GuestAgentError(command, reply.errorClass, reply.desc);
      return reply.value;
    });
  }

  private async syncNow(timeoutMs: number): Promise<void> {
    const id = randomInt(1, 2 ** 31);
    this.needsSync = true;
    // A leading 0xFF makes the agent drop any half-parsed input of an earlier client.
    const reply = await this.exchange({ execute: 'guest-sync-delimited', arguments: { id } }, id, timeoutMs);
    if (!reply.ok) throw new GuestAgentError('guest-sync-delimited', reply.errorClass, reply.desc);
    this.needsSync = false;
  }

  private serial<T>(fn: () => Promise<T>): Promise<T> {
    const run = this.queue.then(fn, fn);
    this.queue = run.catch(() => undefined);
    return run;
  }

  private exchange(request: Record<string, unknown>, syncId: number | undefined, timeoutMs: number): Promise<Reply> {
    if (this.closedErr) return Promise.reject(this.closedErr);
    const command = String(request.execute);
    const answer = new Promise<Reply>((resolve, reject) => {
      this.pending = { syncId, sawSentinel: false, resolve, reject };
    });
    if (syncId === undefined) this.buf = Buffer.alloc(0); // nothing unasked-for is a valid answer
    const line = Buffer.from(`${JSON.stringify(request)}\n`);
    this.sock.write(syncId === undefined ? line : Buffer.concat([Buffer.from([QGA_SENTINEL]), line]));
    this.onData(Buffer.alloc(0));
    return bounded(answer, timeoutMs, () => {
      this.pending = null;
      this.needsSync = true; // its answer may still come: the next exchange syncs past it
      return new GuestAgentUnavailable(`guest agent did not answer ${command} within ${timeoutMs} ms`);
    });
  }

  private onData(d: Buffer): void {
    const p = this.pending;
    if (!p) return; // nobody asked: dropped (a sync discards leftovers anyway)
    this.buf = this.buf.length ? Buffer.concat([this.buf, d]) : d;
    for (;;) {
      if (p.syncId !== undefined && !p.sawSentinel) {
        const at = this.buf.indexOf(QGA_SENTINEL);
        if (at < 0) {
          this.buf = Buffer.alloc(0); // all of it is before the sentinel: garbage by definition
          return;
        }
        this.buf = this.buf.subarray(at + 1);
        p.sawSentinel = true;
      }
      const nl = this.buf.indexOf(0x0a);
      if (nl < 0) {
        if (this.buf.length > MAX_BUFFERED) this.fail(p, new GuestAgentError(String(p.syncId ?? 'reply'), 'ProtocolError', `an answer longer than ${MAX_BUFFERED} bytes`));
        return;
      }
      const text = this.buf.subarray(0, nl).toString('utf8').trim();
      this.buf = this.buf.subarray(nl + 1);
      if (!text) continue;
      const msg = parseReply(text);
      if (p.syncId !== undefined) {
        // The answer to our sync is {"return": id}; anything else came from an earlier sync: look for the next sentinel.
        if (msg && (msg.ok ? msg.value === p.syncId : true)) return this.settle(p, msg);
        p.sawSentinel = false;
        continue;
      }
      if (!msg) return this.fail(p, new GuestAgentError('reply', 'ProtocolError', `the guest agent sent something that is not a QGA reply: ${JSON.stringify(text.slice(0, 200))}`));
      return this.settle(p, msg);
    }
  }

  private settle(p: Pending, msg: Reply): void {
    if (this.pending === p) this.pending = null;
    p.resolve(msg);
  }

  private fail(p: Pending, err: Error): void {
    if (this.pending === p) this.pending = null;
    this.needsSync = true;
    this.buf = Buffer.alloc(0);
    p.reject(err);
  }
}

/** The `return` of `command` in the shape QGA documents, or a clear protocol error. */
function answerOf<T>(command: string, schema: z.ZodType<T>, value: unknown): T {
  const r = schema.safeParse(value);
  if (!r.success) throw new GuestAgentError(command, 'ProtocolError', `unexpected answer ${JSON.stringify(value)?.slice(0, 200)}`);
  return r.data;
}

/** `p`, or the error `onTimeout` makes after `ms`. The timer never keeps the process alive. */
function bounded<T>(p: Promise<T>, ms: number, onTimeout: () => Error): Promise<T> {
  return new Promise<T>((resolve, reject) => {
    const timer = setTimeout(() => reject(onTimeout()), ms);
    timer.unref();
    p.then(
      (v) => {
        clearTimeout(timer);
        resolve(v);
      },
      (e: unknown) => {
        clearTimeout(timer);
        reject(e as Error);
      },
    );
  });
}
