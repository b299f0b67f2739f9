// A check-in in a process of its own, for tests that kill it outright (test/e2e/parked.test.ts).
// Usage: node upload-child.js HOME USER PASSWORD DESKTOP
import { upload } from '../../src/client/ops.js';

const [home, user, password, desktop] = process.argv.slice(2) as [string, string, string, string];
await upload({ home, user, password: async () => password, log: () => undefined, pollMs: 20 }, desktop, 'checkin');
