import { createHash, randomBytes, timingSafeEqual } from 'node:crypto';
import type { WebSocket } from 'ws';
import type { BrokerContext } from '../context.js';
import type { HostCommandRow } from '../hosts/store.js';
import { HttpError } from '../http.js';
import { KeyedWaiters } from '../keyed-waiters.js';

/**
 * The display relay (issue 26 item 3). A desktop host never listens: when a browser connects to a
 * desktop's display, the broker queues a `display` command for the host that runs it, with a
 * session id and a one-time token; the host dials back (outbound WebSocket, host secret + token)
 * and pipes that socket to its QEMU's VNC unix socket; the broker pairs the two and copies bytes
 * both ways. Sessions live in this broker's memory only (the two sockets are here).
 */

/** How long the browser waits for its host to dial back. */
export const PAIRING_TIMEOUT_MS = 10_000;
/** Per direction: a reader stops reading while its peer has this much unsent. */
const HIGH_WATER = 1 << 20;
/** What a browser may send before its host is there (noVNC sends nothing before the server's greeting). */
const EARLY_LIMIT = 64 * 1024;

/** Close codes the page shows (4000–4999: the application's own). */
export const CLOSE = {
  ended: 4001, // an administrator ended it
  hostFailed: 4011, // the host could not reach the guest's screen
  noHost: 4008, // the host did not dial back in time
  peerGone: 4010, // the other side closed
  overflow: 1009,
} as const;

interface Session {
  id: string;
  user: string;
  desktopId: string;
  desktopName: string;
  hostId: string;
  via: 'session' | 'ticket';
  openedAt: number;
  pairedAt: number | null;
  /** sha256 of the host's one-time token. */
  tokenHash: Buffer;
  /** Given to the host with its command until it dials (memory only, never stored). */
  token: string;
  /** Set once a host connection passed its checks: a second one with the same token is refused. */
  claimed: boolean;
  browser: WebSocket;
  host: WebSocket | null;
  early: Buffer[];
  earlyBytes: number;
  toBrowser: number;
  toHost: number;
  timer: NodeJS.Timeout;
  ended: boolean;
}

export interface DisplayView {
  id: string; user: string; desktopId: string; desktop: string; host: string; via: string; openedAt: string; paired: boolean; seconds: number; bytesToBrowser: number; bytesToHost: number;
}

const sha256 = (s: string) => createHash('sha256').update(s).digest();
const raw = (d: Buffer | ArrayBuffer | Buffer[]): Buffer => (Buffer.isBuffer(d) ? d : Array.isArray(d) ? Buffer.concat(d) : Buffer.from(d));

export class DisplayRelay {
  private readonly sessions = new Map<string, Session>();
  private readonly waiters = new KeyedWaiters();
  /** Tests shorten it. */
  pairingTimeoutMs = PAIRING_TIMEOUT_MS;

  constructor(private readonly ctx: BrokerContext) {
    ctx.hosts.onQueued((hostId) => this.wake(hostId));
  }

  /** A browser authorized by the route: queues the host's command and waits (bounded) for the host. */
  async open(browser: WebSocket, who: { user: string; desktopId: string; desktopName: string; hostId: string; via: 'session' | 'ticket' }): Promise<string> {
    const token = randomBytes(32).toString('base64url');
    const early: Buffer[] = [];
    // Listeners first: nothing the browser sends or does meanwhile is missed.
    const s = { ...who, early, earlyBytes: 0 } as Partial<Session> & { early: Buffer[]; earlyBytes: number };
    browser.on('message', (d) => {
      const buf = raw(d);
      if (s.host) return;
      s.earlyBytes += buf.length;
      if (s.earlyBytes > EARLY_LIMIT) return void browser.close(CLOSE.overflow, 'too much sent before the desktop host connected');
      early.push(buf);
    });
    const id = await this.ctx.hosts.queue({ hostId: who.hostId, desktopId: who.desktopId, type: 'display' });
    const session: Session = Object.assign(s, {
      id, openedAt: Date.now(), pairedAt: null, tokenHash: sha256(token), token, claimed: false, browser, host: null, toBrowser: 0, toHost: 0, ended: false,
      timer: setTimeout(() => void this.end(id, CLOSE.noHost, `the desktop host did not connect within ${this.pairingTimeoutMs / 1000} s`, 'timeout'), this.pairingTimeoutMs),
    }) as Session;
    session.timer.unref();
    this.sessions.set(id, session);
    browser.on('close', () => void this.end(id, CLOSE.peerGone, 'the browser closed the display', 'browser'));
    browser.on('error', () => void this.end(id, CLOSE.peerGone, 'the browser connection failed', 'browser'));
    await this.ctx.audit({ actor: who.user, desktopId: who.desktopId, action: 'display-open', outcome: 'ok', detail: `session ${id} via ${who.via}, host ${who.hostId}` });
    if (browser.readyState !== 1) await this.end(id, CLOSE.peerGone, 'the browser closed the display', 'browser');
    return id;
  }

  /**
   * What a host is told of its pending commands: display commands carry their one-time token while
   * their browser waits; one no browser waits for any more (this broker restarted) is failed, never sent.
   */
  async commandsFor(hostId: string, pending: HostCommandRow[]): Promise<{ id: string; type: string; desktopId: string; token?: string }[]> {
    const out = [];
    for (const c of pending) {
      if (c.type !== 'display') out.push({ id: c.id, type: c.type, desktopId: c.desktopId });
      else {
        const s = this.sessions.get(c.id);
        if (s && s.hostId === hostId && !s.claimed && !s.ended) out.push({ id: c.id, type: c.type, desktopId: c.desktopId, token: s.token });
        else if (!s) await this.ctx.hosts.ack(c.id, hostId, false, 'no browser waits for this display any more');
      }
    }
    return out;
  }

  /** A host's long poll: settles when a command is queued for it, when `signal` aborts, or after `ms`; registered at once (call it before looking). */
  waiter(hostId: string, ms: number, signal?: AbortSignal): Promise<void> {
    return this.waiters.wait(hostId, ms, signal);
  }
  /** A host whose credential was revoked: its open displays close, its long poll wakes (and is refused). */
  cutOff(hostId: string): void {
    for (const s of this.sessions.values()) if (s.hostId === hostId) void this.end(s.id, CLOSE.ended, `desktop host ${hostId} was revoked`, 'host-revoked');
    this.wake(hostId);
  }

  private wake(hostId: string) {
    this.waiters.wake(hostId);
  }

  /** Checks a host's dial-back before its upgrade (one claim per token): 404 unknown session, 403 wrong host or token. */
  claim(id: string, hostId: string, token: string): void {
    const s = this.sessions.get(id);
    if (!s || s.ended) throw new HttpError(404, 'no-display-session', `no display session ${id} waits for a host`);
    const given = sha256(token);
    if (s.hostId !== hostId || !timingSafeEqual(given, s.tokenHash)) throw new HttpError(403, 'bad-display-token', 'this display session is not this host\'s, or the token does not match');
    if (s.claimed) throw new HttpError(409, 'display-claimed', `display session ${id} already has its host connection`);
    s.claimed = true;
    s.token = '';
  }

  /** The host's socket, claimed: the two are paired and bytes flow both ways. */
  attach(id: string, host: WebSocket): void {
    const s = this.sessions.get(id);
    if (!s || s.ended) return void host.close(CLOSE.peerGone, 'the browser has gone');
    clearTimeout(s.timer);
    s.host = host;
    s.pairedAt = Date.now();
    host.on('close', () => void this.end(id, CLOSE.peerGone, 'the desktop host closed the display', 'host'));
    host.on('error', () => void this.end(id, CLOSE.peerGone, 'the desktop host connection failed', 'host'));
    pipe(host, s.browser, (n) => (s.toBrowser += n));
    pipe(s.browser, host, (n) => (s.toHost += n));
    for (const b of s.early.splice(0)) {
      s.toHost += b.length;
      host.send(b, { binary: true });
    }
  }

  /** The host reported it could not connect the guest's screen. */
  async hostFailed(id: string, message: string | null): Promise<void> {
    await this.end(id, CLOSE.hostFailed, `the desktop host could not open the screen: ${message ?? 'no reason given'}`, 'host');
  }

  list(): DisplayView[] {
    return [...this.sessions.values()].filter((s) => !s.ended).map((s) => ({
      id: s.id, user: s.user, desktopId: s.desktopId, desktop: s.desktopName, host: s.hostId, via: s.via, openedAt: new Date(s.openedAt).toISOString(),
      paired: s.host !== null, seconds: Math.round((Date.now() - s.openedAt) / 1000), bytesToBrowser: s.toBrowser, bytesToHost: s.toHost,
    }));
  }
  has(id: string): boolean {
    return Boolean(this.sessions.get(id) && !this.sessions.get(id)!.ended);
  }

  /** Closes both sockets (once) and audits how long it lasted and who ended it. */
  async end(id: string, code: number, reason: string, by: string): Promise<boolean> {
    const s = this.sessions.get(id);
    if (!s || s.ended) return false;
    s.ended = true;
    this.sessions.delete(id);
    clearTimeout(s.timer);
    const why = Buffer.from(reason).subarray(0, 120).toString();
    for (const ws of [s.browser, s.host]) if (ws && ws.readyState < 2) ws.close(code, why);
    // A host that never dialed: its command is failed here, so no later poll brings it.
    if (!s.pairedAt) await this.ctx.hosts.ack(id, s.hostId, false, reason).catch(() => false);
    const secs = ((Date.now() - s.openedAt) / 1000).toFixed(1);
    await this.ctx.audit({
      actor: by.startsWith('admin:') ? by.slice(6) : s.user, desktopId: s.desktopId, action: 'display-close', outcome: code === CLOSE.noHost || code === CLOSE.hostFailed ? 'failed' : 'ok',
      detail: `session ${id} of ${s.user} (via ${s.via}, host ${s.hostId}): ${secs} s, ${s.toBrowser} bytes to the browser, ${s.toHost} to the host; ${reason}`,
    });
    return true;
  }

  async closeAll(): Promise<void> {
    for (const id of [...this.sessions.keys()]) await this.end(id, 1001, 'the broker is stopping', 'broker');
  }
}

/** Copies `from`'s messages to `to`; `from` stops reading while `to` has more than HIGH_WATER unsent. */
function pipe(from: WebSocket, to: WebSocket, count: (n: number) => void): void {
  from.on('message', (d, isBinary) => {
    if (to.readyState !== 1) return;
    const buf = raw(d);
    count(buf.length);
    to.send(buf, { binary: isBinary }, () => {
      if (from.isPaused && to.bufferedAmount < HIGH_WATER / 2) from.resume();
    });
    if (to.bufferedAmount > HIGH_WATER) from.pause();
  });
}

const relays = new WeakMap<BrokerContext, DisplayRelay>();
/** The broker's relay (one per context: its sessions are this process's sockets). */
export function displayRelay(ctx: BrokerContext): DisplayRelay {
  let r = relays.get(ctx);
  if (!r) relays.set(ctx, (r = new DisplayRelay(ctx)));
  return r;
}
