import type { Migration } from '../../sql/driver.js';

/**
 * Tables and columns for revocation, cut-off and the tamper-evident audit trail (issue 11).
 * A component of its own ("trust") so it versions independently of the broker's tables.
 */
export const TRUST_MIGRATIONS: Migration[] = [
  {
    version: 1,
    sql: `
ALTER TABLE devices ADD COLUMN revoked_at TEXT;
ALTER TABLE checkouts ADD COLUMN cut_off_at TEXT;
ALTER TABLE events ADD COLUMN prev_hash TEXT;
ALTER TABLE events ADD COLUMN hash TEXT;
`,
  },
  {
    // Replay protection for device-signed requests, shared by every broker on the database.
    version: 2,
    sql: 'CREATE TABLE agent_nonces (device_id TEXT NOT NULL, nonce TEXT NOT NULL, expires_at BIGINT NOT NULL, PRIMARY KEY (device_id, nonce));',
  },
  {
    // Failed-login backoff, shared by every broker on the database and kept across restarts.
    version: 3,
    sql: 'CREATE TABLE login_failures (key TEXT PRIMARY KEY, failures INTEGER NOT NULL, last_failure BIGINT NOT NULL, blocked_until BIGINT NOT NULL DEFAULT 0);',
  },
  {
    // The audit chain keyed (HMAC): 1 on keyed links; NULL on the plain SHA-256 ones from before.
    version: 4,
    sql: 'ALTER TABLE events ADD COLUMN keyed INTEGER;',
  },
];
