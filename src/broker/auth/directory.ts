import { Client, InvalidCredentialsError } from 'ldapts';
import { CarryonError } from '../../core/errors.js';
import type { MetadataStore } from '../db/metadata.js';
import { verifyPassword } from './passwords.js';

export interface LdapConfig {
  url: string;
  /** e.g. "uid={user},ou=people,dc=example,dc=org" or "{user}@corp.example" for AD. */
  userDnTemplate: string;
  /** Base for group search; groups whose `member` is the user's DN. */
  groupBase?: string;
  /** Members of this LDAP group get the admin role. */
  adminGroup?: string;
  /** Upgrade an ldap:// connection with StartTLS before binding. */
  startTls?: boolean;
  /** Allow a plain ldap:// connection without StartTLS (passwords in clear: test labs only). */
  allowInsecure?: boolean;
  /**
   * The directory tells user names apart by case. Off by default: `uid` (OpenLDAP) and
   * `sAMAccountName`/UPN (AD) match regardless of case, so "Alice" and "alice" are one account.
   */
  caseSensitiveNames?: boolean;
}

/**
 * The one spelling the broker records a directory user under: the name folded to lower case
 * where the directory ignores case, so throttling, records and audit are per account, not per
 * spelling. A name as typed where there is no directory (local users are matched exactly).
 */
export function accountName(ldap: LdapConfig | undefined, username: string): string {
  return ldap && !ldap.caseSensitiveNames ? username.toLowerCase() : username;
}

/**
 * Passwords go to the directory in a bind: only over ldaps://, or ldap:// upgraded with StartTLS,
 * unless the configuration says `allowInsecure: true` explicitly.
 */
export function checkLdapConfig(ldap: LdapConfig): void {
  const scheme = ldap.url.split(':')[0]?.toLowerCase();
  if (scheme !== 'ldap' && scheme !== 'ldaps') throw new CarryonError('bad-config', `LDAP url must be ldaps:// or ldap://, got ${ldap.url}`);
  if (scheme === 'ldaps' && ldap.startTls) throw new CarryonError('bad-config', 'startTls is for ldap:// URLs; ldaps:// is TLS already');
  if (scheme === 'ldap' && !ldap.startTls && !ldap.allowInsecure) {
    throw new CarryonError('bad-config', `LDAP url ${ldap.url} would send passwords in clear: use ldaps://, set "startTls": true, or (test labs only) "allowInsecure": true`);
  }
}

export interface Authenticated {
  name: string;
  role: 'admin' | 'user';
  groups: string[];
}

/** The directory could not be asked (down, unreachable, misconfigured): not the user's fault. */
export class DirectoryUnavailableError extends CarryonError {
  constructor(detail: string) {
    super('directory-unavailable', `the LDAP directory could not be reached: ${detail}`);
  }
}

const USER_RE = /^[A-Za-z0-9._@-]{1,64}$/;

/** Escapes a value for an LDAP DN attribute (RFC 4514). */
function escapeDn(value: string): string {
  return value.replace(/[,=+<>#;\\"]/g, (c) => `\\${c}`);
}

/**
 * Local users (scrypt) first; when LDAP is configured, users unknown locally (or marked as
 * LDAP users) bind against the directory, and their groups come from it.
 */
export async function authenticate(meta: MetadataStore, ldap: LdapConfig | undefined, username: string, password: string): Promise<Authenticated | null> {
  if (!USER_RE.test(username) || password.length === 0) return null;
  const local = await meta.getUser(username);
  if (local && local.disabled) return null;
  if (local && local.source === 'local') {
    if (!(await verifyPassword(password, local.passwordHash))) return null;
    return { name: local.name, role: local.role, groups: await meta.groupsOf(local.name) };
  }
  if (!ldap) {
    await verifyPassword(password, null);
    return null;
  }
  const typed = username;
  username = accountName(ldap, typed);
  const known = username === typed ? local : await meta.getUser(username);
  // Another spelling of a local account's name is not a way into it through the directory.
  if (known && (known.disabled || known.source === 'local')) {
    await verifyPassword(password, null);
    return null;
  }
  const dn = ldap.userDnTemplate.replace('{user}', escapeDn(username));
  checkLdapConfig(ldap);
  const client = new Client({ url: ldap.url, timeout: 5000, connectTimeout: 5000 });
  try {
    if (ldap.startTls) await client.startTLS({});
    await client.bind(dn, password);
    let groups: string[] = [];
    if (ldap.groupBase) {
      const { searchEntries } = await client.search(ldap.groupBase, { scope: 'sub', filter: `(|(member=${dn})(uniqueMember=${dn})(memberUid=${username}))`, attributes: ['cn'] });
      groups = searchEntries.map((e) => String(e.cn));
    }
    const role: 'admin' | 'user' = ldap.adminGroup && groups.includes(ldap.adminGroup) ? 'admin' : known?.role ?? 'user';
    if (!known) await meta.createUser({ name: username, passwordHash: null, role, source: 'ldap' });
    return { name: username, role, groups: [...new Set([...groups, ...(await meta.groupsOf(username))])] };
  } catch (err) {
    if (err instanceof InvalidCredentialsError) return null;
    throw new DirectoryUnavailableError((err as Error).message);
  } finally {
    await client.unbind().catch(() => undefined);
  }
}
