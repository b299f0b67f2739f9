import { createHash, X509Certificate } from 'node:crypto';
import { connect as tlsConnect, type PeerCertificate, type TLSSocket } from 'node:tls';
import { Agent, buildConnector } from 'undici';
import { CarryonError } from '../core/errors.js';

/** SHA-256 fingerprint of a certificate, as lowercase hex (what `carryon server` prints). */
export function certFingerprint(certPemOrDer: string | Buffer): string {
  const x509 = new X509Certificate(certPemOrDer);
  return createHash('sha256').update(x509.raw).digest('hex');
}

function normalise(fp: string): string {
  return fp.replace(/[^0-9a-fA-F]/g, '').toLowerCase();
}

export class PinMismatchError extends CarryonError {
  constructor(expected: string, actual: string) {
    super('pin-mismatch', `server certificate fingerprint ${actual} does not match the pinned ${expected}`);
  }
}

/**
 * undici Agent that trusts exactly one certificate, by SHA-256 fingerprint (self-signed servers
 * pinned at enrolment), instead of the CA system. Any other certificate fails the connection.
 * `servername`: the TLS SNI name to present whatever the URL's host (a gateway that routes by
 * name to the server behind it; the pin is still that server's certificate, end to end).
 */
export function pinnedAgent(fingerprint: string, opts: { connections?: number; connectTimeoutMs?: number; answerTimeoutMs?: number; servername?: string } = {}): Agent {
  const expected = normalise(fingerprint);
  // No TLS session resumption: a resumed session may not expose the peer certificate to check.
  const base = buildConnector({ rejectUnauthorized: false, maxCachedSessions: 0, ...(opts.connectTimeoutMs ? { timeout: opts.connectTimeoutMs } : {}) });
  return new Agent({
    connections: opts.connections ?? 8,
    // Node's default, given: else undici loads node:http at every client to read it (≈ 5 ms of a command's start).
    maxHeaderSize: 16 * 1024,
    ...(opts.answerTimeoutMs ? { headersTimeout: opts.answerTimeoutMs, bodyTimeout: opts.answerTimeoutMs } : {}),
    connect(options, callback) {
      base(opts.servername ? { ...options, servername: opts.servername } : options, (err, socket) => {
        if (err || !socket) return callback(err ?? new Error('connect failed'), null);
        const cert = (socket as TLSSocket).getPeerCertificate?.() as PeerCertificate | undefined;
        const actual = cert?.raw ? createHash('sha256').update(cert.raw).digest('hex') : '';
        if (actual !== expected) {
          socket.destroy();
          return callback(new PinMismatchError(expected, actual || 'none'), null);
        }
        callback(null, socket);
      });
    },
  });
}

/** Connects once and returns the server's certificate fingerprint (trust-on-first-use enrolment). */
export function probeFingerprint(host: string, port: number, timeoutMs = 10_000): Promise<string> {
  return new Promise((resolve, reject) => {
    const socket = tlsConnect({ host, port, rejectUnauthorized: false, servername: host === '127.0.0.1' ? undefined : host });
    const timer = setTimeout(() => {
      socket.destroy();
      reject(new CarryonError('timeout', `no TLS answer from ${host}:${port}`));
    }, timeoutMs);
    socket.once('secureConnect', () => {
      clearTimeout(timer);
      const raw = socket.getPeerCertificate().raw;
      socket.end();
      resolve(createHash('sha256').update(raw).digest('hex'));
    });
    socket.once('error', (err) => {
      clearTimeout(timer);
      reject(err);
    });
  });
}

/**
 * A TLS connection to `host:port` whose certificate is checked against the pin before anything
 * is written on it (a WebSocket's upgrade carries secrets): resolves once checked, else rejects.
 */
export function pinnedTlsSocket(host: string, port: number, fingerprint: string, timeoutMs = 10_000): Promise<TLSSocket> {
  const expected = normalise(fingerprint);
  return new Promise((resolve, reject) => {
    const socket = tlsConnect({ host, port, rejectUnauthorized: false, ALPNProtocols: ['http/1.1'], servername: /^[\d.]+$|:/.test(host) ? undefined : host });
    const timer = setTimeout(() => (socket.destroy(), reject(new CarryonError('timeout', `no TLS answer from ${host}:${port}`))), timeoutMs);
    socket.once('secureConnect', () => {
      clearTimeout(timer);
      const raw = socket.getPeerCertificate().raw;
      const actual = raw ? createHash('sha256').update(raw).digest('hex') : '';
      if (actual !== expected) return (socket.destroy(), reject(new PinMismatchError(expected, actual || 'none')));
      resolve(socket);
    });
    socket.once('error', (err) => (clearTimeout(timer), reject(err)));
  });
}
