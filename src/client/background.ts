import { spawn } from 'node:child_process';
import { readdirSync } from 'node:fs';
import { getPriority, setPriority } from 'node:os';
import { fileURLToPath } from 'node:url';
import { CarryonError } from '../core/errors.js';
import type { ClientEnv } from './session/session.js';

/**
 * Background replicas (the agent's scheduled ones, `carryon replicate --background`) run at a low
 * CPU priority, so a desktop in use keeps the laptop's cores: the sender's compression, sealing
 * and TLS run only when the guest leaves CPU over. Its disk reads are the holder's (over NBD) or
 * a stopped chain's, and the holder's fold of a background replica yields by a speed limit
 * (live/live-chain.ts BACKGROUND_FOLD_BYTES_PER_S).
 */
export const BACKGROUND_NICE = 15;

/**
 * Lowers this process to BACKGROUND_NICE: every thread it has now (on Linux nice is a thread's,
 * and setpriority on the process id reaches the main thread only); threads made later inherit it.
 * Never raises a priority (an unprivileged process could not take it back).
 */
export function lowerOwnPriority(nice = BACKGROUND_NICE): void {
  let tids: number[];
  try {
    tids = readdirSync('/proc/self/task').map(Number).filter((n) => Number.isInteger(n) && n > 0);
  } catch {
    tids = [process.pid]; // no /proc: the main thread, where the sender's work runs
  }
  for (const tid of tids) {
    try {
      if (getPriority(tid) < nice) setPriority(tid, nice);
    } catch {
      // the thread ended meanwhile
    }
  }
}

const CLI = fileURLToPath(new URL('../cli/main.js', import.meta.url));
/** The agent's own heap flags (cli/node-flags.ts, set by its launcher) go to the replica too. */
const heapFlags = () => process.execArgv.filter((a) => /^--(max-semi-space-size|heap-growing-percent)=/.test(a));

/**
 * The agent's scheduled replica: `carryon replicate --background DESKTOP` in a process of its own,
 * which lowers its own priority (the agent itself stays at normal priority for locks and wipes).
 * The password goes over a pipe (`--password-file -`: its stdin), never in argv or the
 * environment. Its log lines become the agent's.
 */
export async function replicateInBackground(env: ClientEnv, desktopId: string): Promise<void> {
  const password = await env.password();
  const args = [...heapFlags(), CLI, '--home', env.home, '--password-file', '-'];
  if (env.user) args.push('--user', env.user);
  if (env.rateLimit) args.push('--limit-rate', String(env.rateLimit.bytesPerSecond));
  args.push('replicate', desktopId, '--background');
  const child = spawn(process.execPath, args, { stdio: ['pipe', 'pipe', 'pipe'] });
  let tail = '';
  child.stderr.setEncoding('utf8').on('data', (d: string) => {
    const lines = (tail + d).split('\n');
    tail = lines.pop()!;
    for (const l of lines) if (l) env.log(l);
  });
  child.stdout.resume();
  child.stdin.on('error', () => undefined);
  child.stdin.end(`${password}\n`);
  const onAbort = () => child.kill('SIGTERM');
  env.signal?.addEventListener('abort', onAbort, { once: true });
  const code = await new Promise<number | null>((resolve, reject) => {
    child.once('error', reject);
    child.once('close', (c) => resolve(c));
  }).finally(() => env.signal?.removeEventListener('abort', onAbort));
  if (tail) env.log(tail);
  if (code !== 0) throw new CarryonError('replica-failed', `the background replica exited with ${code}`);
}
