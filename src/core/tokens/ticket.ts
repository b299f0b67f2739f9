import type { KeyObject } from 'node:crypto';
import { z } from 'zod';
import { CarryonError } from '../errors.js';
import { signBytes, verifyBytes } from '../signing.js';

/** A transfer ticket: the broker's signed permission to move one job's chunks on one server. */
export const TicketPayload = z.object({
  v: z.literal(1),
  jobId: z.string().min(1),
  desktopId: z.string().min(1),
  checkoutId: z.string().min(1),
  direction: z.enum(['download', 'upload']),
  manifests: z.array(z.string().regex(/^[0-9a-f]{64}$/)).min(1),
  /** Upload tickets: the checkout's checkpoint manifests (the only chunks whose presence is told, and delta bases). */
  baseManifests: z.array(z.string().regex(/^[0-9a-f]{64}$/)).max(64).optional(),
  /** Lineage keys wrapped by the datacenter master key, and the wrap context. */
  wrappedKeys: z.string().min(1),
  keyContext: z.string().min(1),
  transferServerId: z.string().min(1),
  maxStreams: z.number().int().min(1).max(64),
  /** Upload tickets of a background replica: the server rebuilds its chunks in the idle CPU class. */
  background: z.literal(true).optional(),
  expiresAt: z.iso.datetime(),
});
export type TicketPayload = z.infer<typeof TicketPayload>;

export class TicketError extends CarryonError {
  constructor(
    readonly reason: 'malformed' | 'signature' | 'expired' | 'wrong-server' | 'revoked',
    message: string,
  ) {
    super(`ticket-${reason}`, message);
  }
}

export function signTicket(payload: TicketPayload, privateKey: KeyObject): string {
  const bytes = Buffer.from(JSON.stringify(TicketPayload.parse(payload)));
  return `${bytes.toString('base64url')}.${Buffer.from(signBytes(privateKey, bytes), 'base64').toString('base64url')}`;
}

export function verifyTicket(ticket: string, publicKey: KeyObject, opts: { now: Date; serverId: string }): TicketPayload {
  const parts = ticket.split('.');
  if (parts.length !== 2 || !parts[0] || !parts[1]) throw new TicketError('malformed', 'ticket is malformed');
  const bytes = Buffer.from(parts[0], 'base64url');
  if (!verifyBytes(publicKey, bytes, Buffer.from(parts[1], 'base64url').toString('base64'))) {
    throw new TicketError('signature', 'ticket signature does not verify');
  }
  let payload: TicketPayload;
  try {
    payload = TicketPayload.parse(JSON.parse(bytes.toString('utf8')));
  } catch {
    throw new TicketError('malformed', 'ticket payload is malformed');
  }
  if (payload.transferServerId !== opts.serverId) throw new TicketError('wrong-server', 'ticket is for another transfer server');
  if (Date.parse(payload.expiresAt) <= opts.now.getTime()) throw new TicketError('expired', `ticket expired at ${payload.expiresAt}`);
  return payload;
}
