// `carryon serve` in a process of its own, for tests that take live replicas of the desktop it
// holds (a replica is taken by the holder: test/e2e/live.test.ts) or kill it outright.
// Usage: node serve-child.js HOME USER PASSWORD DESKTOP — prints the NBD socket path on stdout.
import { serveDesktop } from '../../src/client/ops/serve.js';

const [home, user, password, desktop] = process.argv.slice(2) as [string, string, string, string];
const served = await serveDesktop({ home, user, password: async () => password, log: (l) => process.stderr.write(`${l}\n`), pollMs: 20 }, desktop);
process.stdout.write(`${served.socketPath}\n`);
await Promise.race([served.stopRequested, new Promise((r) => process.once('SIGTERM', r))]);
await served.close();
process.stdout.write('closed\n');
