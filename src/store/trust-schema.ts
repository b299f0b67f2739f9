import type { Migration } from './sqlite.js';

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
];
