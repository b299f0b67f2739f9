import type { KeyObject } from 'node:crypto';
import { z } from 'zod';
import { CarryonError } from '../errors.js';
import { signBytes, verifyBytes } from '../signing.js';

/** Offline credential: the broker's signed statement of what this device may run, until when. */
export const LeasePayload = z.object({
  v: z.literal(1),
  user: z.string().min(1),
  deviceId: z.string().min(1),
  desktops: z.array(z.string().min(1)),
  deadline: z.iso.datetime(),
  issuedAt: z.iso.datetime(),
  policyHash: z.string().regex(/^[0-9a-f]{64}$/),
});
export type LeasePayload = z.infer<typeof LeasePayload>;

export const SignedLease = z.object({ payload: z.string().min(1), signature: z.string().min(1) });
export type SignedLease = z.infer<typeof SignedLease>;

export class LeaseError extends CarryonError {
  constructor(
    readonly reason: 'malformed' | 'signature' | 'expired' | 'wrong-device' | 'not-covered',
    message: string,
  ) {
    super(`lease-${reason}`, message);
  }
}

export function signLease(payload: LeasePayload, privateKey: KeyObject): SignedLease {
  const bytes = Buffer.from(JSON.stringify(LeasePayload.parse(payload)));
  return { payload: bytes.toString('base64'), signature: signBytes(privateKey, bytes) };
}

/**
 * Verifies signature, device, desktop and deadline. `now` is the caller's trusted time: on a
 * laptop, max(clock, latest time seen), so turning the clock back does not extend a lease.
 */
export function verifyLease(
  lease: unknown,
  publicKey: KeyObject,
  opts: { now: Date; deviceId: string; desktopId?: string },
): LeasePayload {
  const parsed = SignedLease.safeParse(lease);
  if (!parsed.success) throw new LeaseError('malformed', 'offline lease is malformed');
  const bytes = Buffer.from(parsed.data.payload, 'base64');
  if (!verifyBytes(publicKey, bytes, parsed.data.signature)) {
    throw new LeaseError('signature', 'offline lease signature does not verify against the pinned broker key');
  }
  let payload: LeasePayload;
  try {
    payload = LeasePayload.parse(JSON.parse(bytes.toString('utf8')));
  } catch {
    throw new LeaseError('malformed', 'offline lease payload is malformed');
  }
  if (payload.deviceId !== opts.deviceId) throw new LeaseError('wrong-device', 'offline lease was issued to another device');
  if (opts.desktopId && !payload.desktops.includes(opts.desktopId)) {
    throw new LeaseError('not-covered', `offline lease does not cover desktop ${opts.desktopId}`);
  }
  if (Date.parse(payload.deadline) <= opts.now.getTime()) {
    throw new LeaseError('expired', `offline lease expired at ${payload.deadline}; connect to the broker to renew it`);
  }
  return payload;
}
