import { spawn } from 'node:child_process';
import { mkdir } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { NODE_FLAGS } from '../src/core/runtime/node-flags.js';
import { run } from './lib/measure.js';
import type { BenchRow, BenchSection } from './types.js';

const child = (name: string) => fileURLToPath(new URL(`./${name}.js`, import.meta.url));

/**
 * The link a laptop really has: loopback measures only CPU. The link is a network namespace of its
 * own whose loopback (MTU 1500) `tc` shapes with tbf while a timed step runs (one rate after the
 * other); broker, transfer server, laptops and an rsync daemon all run inside it. The first check-out
 * is of a `sizeMiB` desktop (all its data crosses the link); check-in and second check-out of a
 * `bigMiB` one with the same data and the rest zeros, after `changeMiB` written (only the change
 * crosses; rsync reads both whole files). Needs root (`ip netns`); netem (added latency) is not in
 * this kernel, so latency rows are left out.
 */
export function slowLinkSection(work: string, sizeMiB: number, bigMiB: number, changeMiB: number, rates: string[]): BenchSection {
  const big = bigMiB >= 1024 ? `${bigMiB / 1024} GiB` : `${bigMiB} MiB`;
  return {
    name: `A desktop over a shaped link (${rates.join(', ')}) vs rsync -z over the same link: first check-out at ${sizeMiB} MiB, check-in and second check-out at ${big}`,
    async run() {
      const dir = join(work, 'slow-link');
      await mkdir(dir, { recursive: true });
      return inNamespace(`${process.pid}-slow`, 'slow-link-child', [dir, String(sizeMiB), String(bigMiB), String(changeMiB), rates.join(',')]);
    },
  };
}

/**
 * `--limit-rate` measured on the wire: in a namespace of its own (unshaped), the loopback's byte
 * counter is the transfer's; every 10 s window of a check-out, one continued by `serve`, a replicate and
 * a check-in must stay within 15% of the cap. (`run` continues a check-out through the same holder as `serve`.)
 */
export function rateLimitSection(work: string, sizeMiB: number, cap: string): BenchSection {
  return {
    name: `--limit-rate ${cap} on the wire (${sizeMiB} MiB of incompressible data per transfer)`,
    async run() {
      const dir = join(work, 'rate-limit');
      await mkdir(dir, { recursive: true });
      return inNamespace(`${process.pid}-rate`, 'rate-limit-child', [dir, String(sizeMiB), cap]);
    },
  };
}

/** Runs bench/<script>.js in a fresh network namespace (loopback up, MTU 1500) and returns the rows it prints. */
async function inNamespace(suffix: string, script: string, args: string[]): Promise<BenchRow[]> {
  const ns = `carryon-bench-${suffix}`;
  await run('ip', ['netns', 'add', ns]);
  try {
    await run('ip', ['netns', 'exec', ns, 'ip', 'link', 'set', 'lo', 'mtu', '1500', 'up']);
    const proc = spawn('ip', ['netns', 'exec', ns, process.execPath, ...NODE_FLAGS, child(script), ...args], { stdio: ['ignore', 'pipe', 'inherit'], env: process.env });
    let out = '';
    proc.stdout.setEncoding('utf8').on('data', (s: string) => (out += s));
    const code = await new Promise<number | null>((r) => proc.once('exit', r));
    if (code !== 0) throw new Error(`bench/${script} in ${ns} exited ${code}`);
    return JSON.parse(out.trim().split('\n').pop() ?? '') as BenchRow[];
  } finally {
    await run('ip', ['netns', 'del', ns]).catch(() => undefined);
  }
}
