import type { KeyObject } from 'node:crypto';
import { z } from 'zod';
import { CarryonError } from '../errors.js';
import { signBytes, verifyBytes } from '../signing.js';

/**
 * A revocation the broker pushes to a transfer server the moment jobs end (a cancel, a cut-off):
 * signed with the key the server already trusts for tickets, for one server. It only ever adds
 * revocations (the heartbeat's list replaces them later), so a replayed one re-revokes jobs that
 * had ended anyway and needs no freshness check.
 */
const Revocation = z.object({
  v: z.literal(1),
  kind: z.literal('revoke'),
  serverId: z.string().min(1).max(100),
  jobIds: z.array(z.string().min(1).max(200)).max(100_000),
  issuedAt: z.iso.datetime(),
}).strict();
export type Revocation = z.infer<typeof Revocation>;

export function signRevocation(r: Revocation, privateKey: KeyObject): string {
  const bytes = Buffer.from(JSON.stringify(Revocation.parse(r)));
  return `${bytes.toString('base64url')}.${Buffer.from(signBytes(privateKey, bytes), 'base64').toString('base64url')}`;
}

/** The job IDs of a revocation signed by the broker for `serverId`; throws on anything else. */
export function verifyRevocation(signed: string, publicKey: KeyObject, serverId: string): string[] {
  const bad = (why: string) => new CarryonError('bad-revocation', `revocation refused: ${why}`);
  const parts = signed.split('.');
  if (parts.length !== 2 || !parts[0] || !parts[1]) throw bad('malformed');
  const bytes = Buffer.from(parts[0], 'base64url');
  if (!verifyBytes(publicKey, bytes, Buffer.from(parts[1], 'base64url').toString('base64'))) throw bad('signature does not verify');
  let r: Revocation;
  try {
    r = Revocation.parse(JSON.parse(bytes.toString('utf8')));
  } catch {
    throw bad('malformed payload');
  }
  if (r.serverId !== serverId) throw bad('it is for another transfer server');
  return r.jobIds;
}
