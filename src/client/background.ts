import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
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
 * Never raises a priority (an unprivileged process could not take it back). Then, where util-linux's
 * `chrt` is, every thread goes to SCHED_IDLE as well (see idleScheduling).
 */
export function lowerOwnPriority(nice = BACKGROUND_NICE): { idle: boolean } {
  lowerNice(nice);
  return { idle: idleScheduling() };
}

/**
 * SCHED_IDLE for every thread of this process (inherited by threads and children made later: the
 * storage daemon that reads the frozen view): nice 15 still takes about a fifth of a 2-core laptop
 * beside a busy guest, where SCHED_IDLE runs only on what the guest and its holder leave idle (the
 * batch class of a backup, as `systemd`'s CPUSchedulingPolicy=idle). Not starved: the kernel gives an
 * idle task a small weight, and a check-in or an interactive replica (normal priority) never waits
 * on it. False where it could not be set (no chrt, not Linux): nice alone then.
 */
function idleScheduling(): boolean {
  if (process.platform !== 'linux') return false;
  const r = spawnSync('chrt', ['--all-tasks', '--idle', '--pid', '0', String(process.pid)], { stdio: 'ignore', timeout: 5000 });
  return r.status === 0;
}

function lowerNice(nice: number): void {
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

const CLI = fileURLToPath(new URL('../cli/carryon.cjs', import.meta.url));
/** The agent's own heap flags (core/runtime/node-flags.ts, set by its launcher) go to the replica too. */
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
  const onAbort = () => void stopChild(child, STOP_GRACE_MS);
  env.signal?.addEventListener('abort', onAbort, { once: true });
  const code = await new Promise<number | null>((resolve, reject) => {
    child.once('error', reject);
    child.once('close', (c) => resolve(c));
  }).finally(() => env.signal?.removeEventListener('abort', onAbort));
  if (tail) env.log(tail);
  if (code !== 0) throw new CarryonError('replica-failed', `the background replica exited with ${code}`);
}

/** How long a stopped background replica may take to put its point back before it is killed. */
const STOP_GRACE_MS = 10_000;

/**
 * SIGTERM (the replica stops sending and puts its point back), then SIGKILL after `graceMs`: at the
 * idle CPU class beside a busy guest even that can wait for CPU, and a lock or a wipe waits on it.
 * A killed replica is safe: its holder abandons the point when the control connection closes, and a
 * stopped chain's merge resumes at its next open (the kill tests of e2e/live and e2e/resume).
 */
export async function stopChild(child: ChildProcess, graceMs: number): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return;
  const ended = new Promise<void>((r) => child.once('exit', () => r()));
  child.kill('SIGTERM');
  const timer = setTimeout(() => child.kill('SIGKILL'), graceMs);
  await ended.finally(() => clearTimeout(timer));
}

/**
 * The agent's background replicas in flight, one per desktop at most. A replica at the idle CPU
 * class can take minutes beside a busy guest, so the heartbeat does not wait for it: a lock, a wipe
 * or an update of the next heartbeat is never held up by it. A command for a desktop stops that
 * desktop's replica first (`stop`: SIGTERM, its point is put back) and waits for its end.
 */
export class BackgroundReplicas {
  private readonly running = new Map<string, { done: Promise<void>; stop: AbortController }>();

  constructor(private readonly log: (line: string) => void) {}

  has(desktopId: string): boolean {
    return this.running.has(desktopId);
  }

  /** Starts `replicate` for `desktopId` unless one is running; its failure is logged with `name`. */
  start(desktopId: string, name: string, replicate: (signal: AbortSignal) => Promise<void>): boolean {
    if (this.running.has(desktopId)) return false;
    const stop = new AbortController();
    const done = replicate(stop.signal)
      .catch((err: unknown) => this.log(`scheduled replication of ${name} ${stop.signal.aborted ? 'stopped' : `failed: ${(err as Error).message}`}`))
      .finally(() => this.running.delete(desktopId));
    this.running.set(desktopId, { done, stop });
    return true;
  }

  /** Stops the replica of `desktopId`, if one runs, and waits for it to end. */
  async stop(desktopId: string): Promise<void> {
    const r = this.running.get(desktopId);
    if (!r) return;
    r.stop.abort();
    await r.done;
  }

  /** Stops every replica in flight and waits for them (the agent ends or restarts into an update). */
  async stopAll(): Promise<void> {
    await Promise.all([...this.running.keys()].map((id) => this.stop(id)));
  }

  /** Waits for every replica in flight (`carryon agent --once`: its replicas are that run's work). */
  async drain(): Promise<void> {
    await Promise.all([...this.running.values()].map((r) => r.done));
  }
}
