import { execFile } from 'node:child_process';
import { createCipheriv, createDecipheriv, createHmac, randomBytes } from 'node:crypto';
import { createReadStream, readFileSync } from 'node:fs';
import { promisify } from 'node:util';

const execFileAsync = promisify(execFile);

/**
 * A command as a stock system runs it: peers (rsync, cp, qemu-nbd, fio…) and tools without the
 * malloc tunables Carryon's launcher gives its own processes (src/core/runtime/node-flags.ts), which the
 * bench process carries for the Carryon processes it starts.
 */
export const run: typeof execFileAsync = ((file: string, args?: readonly string[] | null, opts?: object) =>
  execFileAsync(file, args ?? [], { ...opts, env: { ...peerEnv(), ...(opts as { env?: NodeJS.ProcessEnv } | undefined)?.env } })) as typeof execFileAsync;

/** This process's environment less what Carryon's launcher adds: for peers spawned directly. */
export function peerEnv(): NodeJS.ProcessEnv {
  const env = { ...process.env };
  delete env.GLIBC_TUNABLES;
  return env;
}

export interface Stats {
  median: number;
  spread: number;
  runs: number;
  values: number[];
}

export function stats(values: number[]): Stats {
  const v = [...values].sort((a, b) => a - b);
  const median = v.length % 2 ? v[(v.length - 1) / 2]! : (v[v.length / 2 - 1]! + v[v.length / 2]!) / 2;
  return { median, spread: median ? (v[v.length - 1]! - v[0]!) / median : 0, runs: v.length, values };
}

/**
 * Runs `fn` n times and returns the stats of what it returns. `warmup` runs come first and are
 * not counted (JIT, worker start-up, page cache), as the table's method note says.
 */
export async function repeat(n: number, fn: (i: number) => Promise<number>, opts: { warmup?: number } = {}): Promise<Stats> {
  for (let i = 0; i < (opts.warmup ?? 0); i++) await fn(-1 - i);
  const out: number[] = [];
  for (let i = 0; i < n; i++) out.push(await fn(i));
  return stats(out);
}

/** Writes dirty pages back first, so a measurement does not share the disk with earlier writes. */
export async function settle(): Promise<void> {
  await run('sync');
}

export async function timed<T>(fn: () => Promise<T>): Promise<{ seconds: number; value: T }> {
  const t = process.hrtime.bigint();
  const value = await fn();
  return { seconds: Number(process.hrtime.bigint() - t) / 1e9, value };
}

/** Single-core throughput of an OpenSSL EVP algorithm at 256 KiB blocks, bytes/s. */
export async function opensslSpeed(alg: 'aes-256-gcm' | 'sha256'): Promise<number> {
  const { stdout } = await run('openssl', ['speed', '-elapsed', '-seconds', '2', '-bytes', '262144', '-evp', alg], { maxBuffer: 1 << 20 });
  const line = stdout.split('\n').find((l) => l.toLowerCase().startsWith(alg === 'sha256' ? 'sha256' : 'aes-256-gcm'));
  const kbps = Number(line?.trim().split(/\s+/).pop()?.replace(/k$/, ''));
  if (!Number.isFinite(kbps)) throw new Error(`cannot parse openssl speed output: ${stdout}`);
  return kbps * 1000;
}

/**
 * The same primitives through Node's own (bundled) OpenSSL, one core, 256 KiB messages: what
 * Carryon can reach at best, which on some CPUs is well below the system's `openssl speed`.
 */
export function nodeCryptoSpeed(alg: 'aes-256-gcm' | 'hmac-sha256' | 'aes-256-gcm-decrypt'): number {
  const key = randomBytes(32);
  const data = randomBytes(256 * 1024);
  const tag = Buffer.alloc(16);
  const once = () => {
    if (alg === 'hmac-sha256') return void createHmac('sha256', key).update(data).digest();
    const iv = randomBytes(12);
    if (alg === 'aes-256-gcm') {
      const c = createCipheriv('aes-256-gcm', key, iv);
      c.update(data);
      c.final();
      return void c.getAuthTag().copy(tag);
    }
    const d = createDecipheriv('aes-256-gcm', key, iv);
    d.setAuthTag(tag);
    d.update(data);
    try {
      d.final(); // fails (random tag): the work is the same as a successful open
    } catch {
      // expected
    }
  };
  for (let i = 0; i < 50; i++) once();
  const n = 2000;
  const t = process.hrtime.bigint();
  for (let i = 0; i < n; i++) once();
  return (n * data.length) / (Number(process.hrtime.bigint() - t) / 1e9);
}

/** Sequential read of a file with 4 MiB reads (page cache as it is: stated in the table). */
export async function readSpeed(path: string): Promise<number> {
  const { seconds, value } = await timed(async () => {
    let n = 0;
    for await (const piece of createReadStream(path, { highWaterMark: 4 << 20 })) n += (piece as Buffer).length;
    return n;
  });
  return value / seconds;
}

export const MB = 1e6;


/** Clock ticks per second of /proc/<pid>/stat's times (USER_HZ: 100 on every Linux this runs on). */
const USER_HZ = 100;

/**
 * CPU seconds (user + system, all threads) of process `pid` so far, from /proc/<pid>/stat;
 * `reaped`: add those of its children it has waited for (cutime, cstime: a child's own reaped
 * children included, so rsync's receiver and generator count once rsync has exited).
 */
export function processCpuSeconds(pid: number | 'self', reaped = false): number {
  const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
  // Fields after the command name (which may hold spaces): state is field 3, utime 14 … cstime 17.
  const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ').map(Number);
  const ticks = f[11]! + f[12]! + (reaped ? f[13]! + f[14]! : 0);
  return ticks / USER_HZ;
}

/** CPU seconds of this process (all its threads: workers, libuv's pool) and of its reaped children. */
export function ownCpuSeconds(): { self: number; children: number } {
  const { user, system } = process.cpuUsage();
  return { self: (user + system) / 1e6, children: processCpuSeconds('self', true) - processCpuSeconds('self') };
}
