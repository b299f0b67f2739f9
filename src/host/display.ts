import { createConnection, type Socket } from 'node:net';
import WebSocket from 'ws';
import { CarryonError } from '../core/errors.js';
import { pinnedTlsSocket } from '../net/pinned-agent.js';

/** A direction stops reading while the other side has this much unsent. */
const HIGH_WATER = 1 << 20;

export interface DisplayDial {
  brokerUrl: string;
  brokerFingerprint: string;
  hostId: string;
  secret: string;
  session: string;
  token: string;
  /** The guest's VNC server (a unix socket in the host's private directory). */
  vncSocket: string;
}

/**
 * Carries out a `display` command: connects the guest's VNC socket, dials the broker (outbound,
 * pinned TLS, host secret + the session's one-time token) and pipes one into the other until
 * either closes. Resolves once both are connected, with a function that ends it.
 */
export async function dialDisplay(d: DisplayDial): Promise<{ closed: Promise<void>; close: () => void }> {
  const vnc = await new Promise<Socket>((resolve, reject) => {
    const s = createConnection(d.vncSocket);
    s.once('connect', () => resolve(s));
    s.once('error', (err) => reject(new CarryonError('no-screen', `the guest's VNC socket does not answer: ${err.message}`)));
  });
  // Nothing read from the guest until the broker's side is there (VNC greets first).
  vnc.pause();
  const u = new URL(d.brokerUrl);
  let ws: WebSocket;
  try {
    const tls = await pinnedTlsSocket(u.hostname.replace(/^\[|\]$/g, ''), Number(u.port || 443), d.brokerFingerprint);
    ws = new WebSocket(`wss://${u.host}/v1/hosts/${encodeURIComponent(d.hostId)}/display/${encodeURIComponent(d.session)}`, {
      headers: { 'x-carryon-host-secret': d.secret, 'x-carryon-display-token': d.token },
      createConnection: () => tls,
      perMessageDeflate: false,
      handshakeTimeout: 10_000,
      maxPayload: 4 * 1024 * 1024,
    });
    await new Promise<void>((resolve, reject) => {
      ws.once('open', resolve);
      ws.once('unexpected-response', (_req, res) => reject(new CarryonError('display-refused', `the broker refused the display connection (HTTP ${res.statusCode})`)));
      ws.once('error', reject);
    });
  } catch (err) {
    vnc.destroy();
    throw err;
  }
  const closed = new Promise<void>((resolve) => {
    let done = false;
    const end = () => {
      if (done) return;
      done = true;
      vnc.destroy();
      if (ws.readyState < 2) ws.close(1000, 'the display ended');
      resolve();
    };
    ws.on('close', end);
    ws.on('error', end);
    vnc.on('close', end);
    vnc.on('error', end);
  });
  ws.on('message', (data) => {
    const buf = Buffer.isBuffer(data) ? data : Array.isArray(data) ? Buffer.concat(data) : Buffer.from(data);
    if (!vnc.write(buf)) {
      ws.pause();
      vnc.once('drain', () => ws.resume());
    }
  });
  vnc.on('data', (buf: Buffer) => {
    if (ws.readyState !== 1) return;
    ws.send(buf, { binary: true }, () => {
      if (vnc.isPaused() && ws.bufferedAmount < HIGH_WATER / 2) vnc.resume();
    });
    if (ws.bufferedAmount > HIGH_WATER) vnc.pause();
  });
  vnc.resume();
  return { closed, close: () => ws.close(1001, 'the desktop host is stopping') };
}
