import { spawn } from 'node:child_process';
import { mkdir } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { NODE_FLAGS } from '../src/cli/node-flags.js';
import { run } from './lib/measure.js';
import type { BenchRow, BenchSection } from './types.js';

const CHILD = fileURLToPath(new URL('./slow-link-child.js', import.meta.url));

/**
 * The link a laptop really has: loopback measures only CPU. Each link is a network namespace of its
 * own whose loopback (MTU 1500) `tc` shapes with tbf while a timed step runs; broker, transfer server,
 * laptops and an rsync daemon all run inside it. Needs root (`ip netns`); netem (added latency) is not
 * in this kernel, so latency rows are left out.
 */
export function slowLinkSection(work: string, sizeMiB: number, changeMiB: number, rates: string[]): BenchSection {
  return {
    name: `A ${sizeMiB} MiB desktop over a shaped link (${rates.join(', ')}) vs rsync -z over the same link`,
    async run() {
      const rows: BenchRow[] = [];
      for (const rate of rates) {
        const ns = `carryon-bench-${process.pid}-${rate}`;
        await run('ip', ['netns', 'add', ns]);
        try {
          await run('ip', ['netns', 'exec', ns, 'ip', 'link', 'set', 'lo', 'mtu', '1500', 'up']);
          const dir = join(work, `slow-${rate}`);
          await mkdir(dir, { recursive: true });
          rows.push(...(await inNamespace(ns, [dir, String(sizeMiB), String(changeMiB), rate, rate.replace('mbit', ' Mbit/s')])));
        } finally {
          await run('ip', ['netns', 'del', ns]).catch(() => undefined);
        }
      }
      return rows;
    },
  };
}

async function inNamespace(ns: string, args: string[]): Promise<BenchRow[]> {
  const child = spawn('ip', ['netns', 'exec', ns, process.execPath, ...NODE_FLAGS, CHILD, ...args], { stdio: ['ignore', 'pipe', 'inherit'], env: process.env });
  let out = '';
  child.stdout.setEncoding('utf8').on('data', (s: string) => (out += s));
  const code = await new Promise<number | null>((r) => child.once('exit', r));
  if (code !== 0) throw new Error(`the slow-link run in ${ns} exited ${code}`);
  const last = out.trim().split('\n').pop() ?? '';
  return JSON.parse(last) as BenchRow[];
}
