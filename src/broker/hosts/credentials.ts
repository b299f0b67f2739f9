import { createHash, randomBytes, timingSafeEqual } from 'node:crypto';

/**
 * Each desktop host's own credential (`carryon admin hosts add ID`): `<host id>:<32 random bytes,
 * base64url>` (net/host-credential.ts). The broker keeps only a hash bound to the host id, so a copied row names no other
 * host, and a stolen host can act only as itself until an admin revokes it. The host sends the
 * whole credential in `x-carryon-host-secret`; the id in it is who the request is from.
 */
export const credentialHash = (hostId: string, secret: string) => createHash('sha256').update(`carryon host credential\0${hostId}\0${secret}`).digest('hex');

export function makeCredential(hostId: string): { credential: string; hash: string } {
  const secret = randomBytes(32).toString('base64url');
  return { credential: `${hostId}:${secret}`, hash: credentialHash(hostId, secret) };
}

export { parseHostCredential as parseCredential } from '../../net/host-credential.js';

/** Whether `secret` is the one whose hash the broker keeps for `hostId` (constant time; a host with no key compares against a dummy). */
export function credentialMatches(stored: string | null, hostId: string, secret: string): boolean {
  const given = Buffer.from(credentialHash(hostId, secret), 'hex');
  const want = Buffer.from(stored ?? '00'.repeat(32), 'hex');
  return timingSafeEqual(given, want.length === given.length ? want : Buffer.alloc(given.length)) && stored !== null;
}
