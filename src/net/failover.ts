import { CarryonError } from '../core/errors.js';

/**
 * How a failed attempt to reach one broker ended, for the client that fails over to the next:
 * - `unsent`: the request provably never reached a broker (refused, no route, name unknown, the
 *   connection not made in time, a TLS handshake that failed or a certificate that is not the
 *   pinned one, a load balancer's 503 "no server"). Any request may go to the next broker.
 * - `maybe-applied`: the request may have reached a broker and been applied, with the answer lost
 *   (reset after sending, no answer in time, a gateway's 502/504). Only a request the caller
 *   declared safe to repeat goes to the next broker.
 */
export type AttemptFailure = 'unsent' | 'maybe-applied';

const UNSENT_CODES = new Set(['ECONNREFUSED', 'ENOTFOUND', 'EAI_AGAIN', 'EHOSTUNREACH', 'ENETUNREACH', 'EADDRNOTAVAIL', 'UND_ERR_CONNECT_TIMEOUT', 'pin-mismatch', 'EPROTO', 'ERR_TLS_CERT_ALTNAME_INVALID']);

/** Classifies an error thrown by undici's `request()` (no HTTP answer came back). */
export function classifyNetworkError(err: unknown): AttemptFailure {
  const code = String((err as { code?: unknown }).code ?? '');
  if (UNSENT_CODES.has(code) || code.startsWith('ERR_SSL_')) return 'unsent';
  const cause = (err as { cause?: unknown }).cause;
  if (cause && cause !== err) return classifyNetworkError(cause);
  return 'maybe-applied';
}

/**
 * An HTTP answer that is not the broker's own: a proxy or load balancer saying the broker behind
 * it is unavailable. The broker's own errors always carry a JSON `error` code, and are answers
 * (4xx, or a 503 such as `directory-unavailable`): those are never failed over.
 */
export function classifyGatewayAnswer(status: number, body: Record<string, unknown> | null): AttemptFailure | null {
  if (body && typeof body.error === 'string') return null;
  if (status === 503) return 'unsent';
  if (status === 502 || status === 504) return 'maybe-applied';
  return null;
}

/** No broker of the list answered. `maybeApplied`: the request may have been applied by one of them. */
export class BrokerUnreachable extends CarryonError {
  constructor(code: 'offline' | 'pin-mismatch', message: string, readonly maybeApplied: boolean) {
    super(code, message);
  }
}
