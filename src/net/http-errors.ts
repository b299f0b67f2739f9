import { ZodError, type z } from 'zod';
import { CarryonError } from '../core/errors.js';

/**
 * One error → HTTP status mapping for the broker and the transfer servers (docs/api.md, "Errors").
 * Client faults are 4xx (400 bad input, 401/403 refused, 404 missing, 409 conflicts), server
 * faults 5xx. A CarryonError code that is not listed is a server fault (500): a new code has to be
 * placed here on purpose before a client can be blamed for it.
 */
const STATUS_BY_CODE: Record<string, number> = {
  // 400: the request itself is wrong
  invalid: 400, 'malformed-json': 400, 'bad-blob': 400, 'bad-manifest': 400, 'bad-frame': 400, 'bad-image': 400,
  'bad-envelope': 400, 'bad-public-key': 400, 'unknown-disk': 400, 'missing-disk': 400, 'bad-name': 400,
  'image-too-small': 400, 'not-whole-sectors': 400, 'relative-path': 400, 'too-long': 400, 'image-names-other-files': 400,
  // 401/403: who is asking, and may they
  unauthenticated: 401, 'bad-credentials': 401, 'bad-secret': 401, 'bad-revocation': 401, 'ticket-malformed': 401, 'ticket-signature': 401, 'ticket-expired': 401,
  'ticket-wrong-server': 403, 'ticket-revoked': 403, 'wrong-direction': 403, 'out-of-scope': 403, forbidden: 403,
  'not-holder': 403, 'not-entitled': 403, 'policy-denied': 403, 'device-revoked': 403, 'reauth-required': 403,
  'import-path-refused': 403, 'not-enrolled': 403, 'cut-off': 403, 'device-not-enrolled': 403, 'device-signature': 401, 'device-unknown': 401,
  // 404: it is not there
  'not-found': 404, 'unknown-manifest': 404, 'missing-chunk': 404, 'not-registered': 404,
  // 409: it is there, but in a state that conflicts
  'wrong-state': 409, exists: 409, 'already-checked-out': 409, 'already-held': 409, 'already-enrolled': 409, busy: 409,
  locked: 409, 'desktop-locked': 409, 'offset-mismatch': 409, incomplete: 409, 'not-empty': 409, 'no-hypervisor': 409, 'disk-busy': 409, 'bad-state': 409, 'job-ended': 409, 'not-held': 409, paused: 409, 'missing-chunks': 409,
  // 413/422/429
  'too-large': 413, 'host-too-small': 422, 'not-enough-disk': 422, 'too-many-attempts': 429, 'too-many-streams': 429,
  // 5xx: our fault, or a dependency's
  'store-corrupt': 500, 'manifest-missing': 500, 'lineage-missing': 500, 'bad-config': 500, internal: 500,
  'transfer-failed': 502, 'directory-unavailable': 503, offline: 503, 'power-off-failed': 503, timeout: 504, 'disk-full': 507,
};

export interface MappedError {
  status: number;
  code: string;
  message: string;
}

export function statusForCode(code: string): number {
  return STATUS_BY_CODE[code] ?? 500;
}

/** First zod issue as one readable line (never the raw issue array). */
export function zodMessage(err: ZodError): string {
  const issue = err.issues[0];
  return `invalid request: ${issue ? `${issue.path.join('.') || 'body'}: ${issue.message}` : 'bad input'}`;
}

/** Parses with zod; a failure is a CarryonError('invalid') with a one-line message. */
export function parseOrInvalid<T extends z.ZodType>(schema: T, value: unknown): z.infer<T> {
  const res = schema.safeParse(value ?? {});
  if (!res.success) throw new CarryonError('invalid', zodMessage(res.error));
  return res.data;
}

/**
 * Maps any thrown value. Errors that carry their own status (the broker's HttpError) keep it;
 * Fastify's own client errors (bad content type, body too large, …) keep theirs; anything else
 * unexpected is a 500 whose message is not shown to the client.
 */
export function mapError(err: unknown): MappedError & { internal: boolean } {
  const e = err as Error & { status?: unknown; statusCode?: unknown; code?: unknown };
  if (err instanceof ZodError) return { status: 400, code: 'invalid', message: zodMessage(err), internal: false };
  if (err instanceof CarryonError) {
    const status = typeof e.status === 'number' ? e.status : statusForCode(err.code);
    return { status, code: err.code, message: err.message, internal: status >= 500 };
  }
  if (typeof e.status === 'number' && typeof e.code === 'string') return { status: e.status, code: e.code, message: e.message, internal: false };
  const sc = typeof e.statusCode === 'number' ? e.statusCode : 0;
  if (sc === 413 || e.code === 'FST_ERR_CTP_BODY_TOO_LARGE') return { status: 413, code: 'body-too-large', message: 'request body is too large', internal: false };
  if (sc === 415 || e.code === 'FST_ERR_CTP_INVALID_MEDIA_TYPE') return { status: 415, code: 'unsupported-media-type', message: 'unsupported media type: send application/json (application/octet-stream where a route takes bytes)', internal: false };
  if (sc >= 400 && sc < 500) return { status: sc, code: 'invalid', message: e.message, internal: false };
  return { status: 500, code: 'internal', message: 'internal error', internal: true };
}
