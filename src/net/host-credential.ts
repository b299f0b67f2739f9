/**
 * A desktop host's own credential, as both sides read it: `<host id>:<32 random bytes, base64url>`
 * (made by the broker, broker/hosts/credentials.ts; sent by the host in `x-carryon-host-secret`).
 * The id in it is who the request is from. The old shared `host.secret` has no id: not one.
 */
export function parseHostCredential(credential: string): { hostId: string; secret: string } | null {
  const at = credential.indexOf(':');
  if (at < 0) return null;
  const hostId = credential.slice(0, at);
  const secret = credential.slice(at + 1);
  return /^[A-Za-z0-9._-]{1,64}$/.test(hostId) && /^[A-Za-z0-9_-]{43}$/.test(secret) ? { hostId, secret } : null;
}
