// Runs inside a network namespace of its own (bench/slow-link.ts's `inNamespace`): nothing but this
// rig uses its loopback, so the interface's byte counter is the transfer's bytes on the wire. Each
// case runs a transfer under `--limit-rate` and reports the fastest and slowest 10 s window.
import { randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { rm } from 'node:fs/promises';
import { join } from 'node:path';
import { checkout, release, status, upload, type ClientEnv } from '../src/client/ops.js';
import { serveDesktop } from '../src/client/ops/serve.js';
import { writeTestImage } from '../src/demo/image.js';
import { NbdClient } from '../src/nbd/client.js';
import { RateLimiter, parseRate } from '../src/transfer-client/rate-limit.js';
import { Rig } from './lib/rig.js';
import type { BenchRow } from './types.js';

const [work, sizeArg, capArg] = process.argv.slice(2);
const size = Number(sizeArg) * 2 ** 20;
if (!work || !Number.isFinite(size) || size <= 0 || !capArg) throw new Error('usage: rate-limit-child WORK SIZE_MIB CAP');
const cap = parseRate(capArg);
const WINDOW_S = 10;

const wireBytes = () => Number(readFileSync('/sys/class/net/lo/statistics/tx_bytes', 'utf8'));

/** Samples the loopback's counter while `fn` runs; the fastest and slowest average over any 10 s inside it. */
async function onTheWire(fn: () => Promise<unknown>): Promise<{ max: number; min: number; seconds: number; bytes: number }> {
  const samples: [number, number][] = [[performance.now() / 1000, wireBytes()]];
  const timer = setInterval(() => samples.push([performance.now() / 1000, wireBytes()]), 100);
  try {
    await fn();
  } finally {
    clearInterval(timer);
  }
  samples.push([performance.now() / 1000, wireBytes()]);
  const at = (t: number) => {
    const i = samples.findIndex(([s]) => s >= t);
    if (i <= 0) return samples[Math.max(0, i)]![1];
    const [t0, b0] = samples[i - 1]!;
    const [t1, b1] = samples[i]!;
    return b0 + ((b1 - b0) * (t - t0)) / (t1 - t0 || 1);
  };
  // The windows lie where the transfer runs: not over the login, unlock and start-up before its first
  // bytes, nor the commit after its last (under 128 KiB moved there).
  const total = samples[samples.length - 1]![1] - samples[0]![1];
  const from = Math.max(0, samples.findIndex(([, b]) => b - samples[0]![1] >= 128 * 1024) - 1);
  const to = samples.length - 1 - Math.max(0, [...samples].reverse().findIndex(([, b]) => samples[samples.length - 1]![1] - b >= 128 * 1024) - 1);
  if (total < 256 * 1024 || to <= from) throw new Error(`only ${total} bytes on the wire`);
  const [start, first] = samples[from]!;
  const [end, last] = samples[to]!;
  if (end - start < WINDOW_S) throw new Error(`the transfer took ${(end - start).toFixed(1)} s: too short for a ${WINDOW_S} s window (make the desktop larger)`);
  let max = 0;
  let min = Infinity;
  for (const [t] of samples.slice(from, to + 1)) {
    if (t + WINDOW_S > end) break;
    const avg = (at(t + WINDOW_S) - at(t)) / WINDOW_S;
    max = Math.max(max, avg);
    min = Math.min(min, avg);
  }
  return { max, min, seconds: end - start, bytes: last - first };
}

/** Writes random data over the whole desktop through `serve`, as a guest would. */
async function overwrite(env: ClientEnv): Promise<void> {
  const served = await serveDesktop(env, 'desk');
  try {
    const c = await NbdClient.connect(served.socketPath, 'disk0');
    for (let off = 0; off < size; off += 4 << 20) await c.write(off, randomBytes(4 << 20));
    await c.flush();
    await c.close();
  } finally {
    await served.close();
  }
}

const rows: BenchRow[] = [];
const row = (name: string, m: { max: number; min: number; seconds: number; bytes: number }) => {
  const within = m.max <= cap * 1.15 && m.min >= cap * 0.85;
  rows.push({ section: 'rate', name: `--limit-rate ${capArg}, ${name}: fastest 10 s on the wire`, value: m.max / 2 ** 20, unit: 'MiB/s', runs: 1, spread: 0,
    peer: { name: 'the cap', value: cap / 2 ** 20, unit: 'MiB/s' },
    note: `slowest 10 s ${(m.min / 2 ** 20).toFixed(2)} MiB/s; ${(m.bytes / 2 ** 20).toFixed(1)} MiB in ${m.seconds.toFixed(1)} s; every 10 s window within 15% of the cap: ${within ? 'met' : 'MISSED'}` });
};

const dir = join(work, 'rig');
const image = join(work, 'desk.raw');
await writeTestImage(image, size, 'random');
const rig = await Rig.start(dir, image);
try {
  const env: ClientEnv = await rig.laptop();
  const limited = { ...env, rateLimit: new RateLimiter(cap) };

  // A whole check-out under the cap (a second laptop).
  const other = await rig.laptop();
  row('a check-out', await onTheWire(() => checkout({ ...other, rateLimit: new RateLimiter(cap) }, 'desk')));
  await release(other, 'desk', 'rollback');

  // A check-out under the cap, stopped after 2 chunks; `serve` (asked for no rate) continues it at the remembered one.
  const abort = new AbortController();
  await checkout({ ...limited, signal: abort.signal, onProgress: (_l, p) => p.chunksDone >= 2 && abort.abort() }, 'desk').catch(() => undefined);
  row('a check-out continued by `serve`', await onTheWire(async () => {
    const served = await serveDesktop(env, 'desk');
    try {
      while ((await status(env, 'desk'))[0]!.state !== 'checked_out') await new Promise((r) => setTimeout(r, 100));
    } finally {
      await served.close();
    }
  }));

  // A replica of as much incompressible data as the desktop holds, under the cap; then a check-in of as much again.
  await overwrite(env);
  row('replicate', await onTheWire(() => upload(limited, 'desk', 'replicate')));
  await overwrite(env);
  row('check-in', await onTheWire(() => upload(limited, 'desk', 'checkin')));
} finally {
  await rig.close();
  await rm(work, { recursive: true, force: true, maxRetries: 5 });
}
process.stdout.write(`${JSON.stringify(rows)}\n`);
process.exit(0);
