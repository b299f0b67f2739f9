// A check-out in a process of its own, for tests that kill it outright (test/e2e/lifecycle.test.ts).
// Usage: node checkout-child.js HOME USER PASSWORD DESKTOP
import { checkout } from '../../src/client/ops.js';

const [home, user, password, desktop] = process.argv.slice(2) as [string, string, string, string];
await checkout({ home, user, password: async () => password, log: () => undefined, pollMs: 20 }, desktop);
