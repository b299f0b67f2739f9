import { existsSync } from 'node:fs';

/** haproxy's path: Debian puts it in /usr/sbin, which a non-root user's PATH lacks. */
export const HAPROXY = ['/usr/sbin/haproxy', '/usr/local/sbin/haproxy'].find((p) => existsSync(p)) ?? 'haproxy';
