import { readFileSync } from 'node:fs';
import { connect } from 'node:net';
import { fileURLToPath } from 'node:url';
import { LocalHostRewriter } from './host-header.js';

/**
 * The guest's path to the laptop's printers: QEMU's user network runs this for each connection the
 * guest opens to 10.0.2.100:631 (guestfwd `cmd:`), with the connection on stdin/stdout, and it
 * joins that to the host's CUPS socket (each request's Host made `localhost`, as CUPS asks of a
 * local client: host-header.ts). It reads the agent's policy file first, at every
 * connection: printing taken away while the desktop runs closes the path for every new job. (The
 * check-out's MACed policy decided at start whether the forward exists at all.)
 */

/** The agent's policy file says printing is no longer allowed (restrict-only; unreadable = no change). */
export function printingRevoked(policyFile: string): boolean {
  try {
    return (JSON.parse(readFileSync(policyFile, 'utf8')) as { printingAllowed?: unknown }).printingAllowed === false;
  } catch {
    return false;
  }
}

export const RELAY_SCRIPT = fileURLToPath(import.meta.url);
/** How long the relay keeps CUPS's side open after the guest stopped sending. */
const HALF_CLOSE_LINGER_MS = 60_000;

function main(argv: string[]): void {
  const [policyFile, cupsSocket] = argv;
  if (!policyFile || !cupsSocket) process.exit(2);
  if (printingRevoked(policyFile)) process.exit(0); // no path: the guest sees the connection closed
  const sock = connect(cupsSocket);
  sock.on('error', () => process.exit(1));
  // CUPS takes a request on its socket only with a loopback Host: each request's is made so.
  const requests = new LocalHostRewriter();
  requests.on('error', () => {
    sock.destroy();
    process.exit(1);
  });
  // The guest's half-close is not passed on at once: CUPS takes a client's EOF as the client gone and
  // drops the answer it is writing. CUPS closes the connection itself after answering a request
  // that asks it to (Connection: close), or once it idles (KeepAliveTimeout); this bound is a backstop.
  process.stdin.pipe(requests).pipe(sock, { end: false });
  requests.on('end', () => setTimeout(() => sock.end(), HALF_CLOSE_LINGER_MS).unref());
  sock.pipe(process.stdout);
  // Exit once CUPS's answer is all out: stdout to a pipe is written asynchronously, so an exit at
  // once would cut the tail of the answer off (the empty write's callback runs after the rest).
  sock.on('close', () => process.stdout.write('', () => process.exit(0)));
}

if (process.argv[1] === RELAY_SCRIPT) main(process.argv.slice(2));
