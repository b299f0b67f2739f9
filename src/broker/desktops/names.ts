import { z } from 'zod';

/** Names Windows reserves for devices (also with an extension: "con.txt"). */
const RESERVED = /^(con|prn|aux|nul|com[0-9]|lpt[0-9]|conin\$|conout\$)(\..*)?$/i;

/**
 * A name for a user, group, pool or desktop: it ends up in paths, command lines and file names
 * on laptops, so `.`, `..`, a leading `-` (an option to a tool), a trailing `.` and device names
 * (`con`, `nul`, `com1`, …) are refused along with anything outside letters, digits and `. _ @ -`.
 */
export const SafeName = z
  .string()
  .regex(/^[A-Za-z0-9._@-]{1,64}$/, 'letters, digits and . _ @ - only (max 64)')
  .refine((n) => n !== '.' && n !== '..', 'cannot be . or ..')
  .refine((n) => !n.startsWith('-'), 'cannot start with -')
  .refine((n) => !n.endsWith('.'), 'cannot end with .')
  .refine((n) => !RESERVED.test(n), 'is a reserved device name (con, prn, aux, nul, com1–9, lpt1–9)');
