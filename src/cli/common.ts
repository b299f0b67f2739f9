import { readFileSync } from 'node:fs';
import { createInterface } from 'node:readline';
import { Writable } from 'node:stream';
import cliProgress from 'cli-progress';
import { CarryonError } from '../core/errors.js';
import { formatBytes } from '../core/format.js';
import type { Progress } from '../transfer-client/client.js';

export { formatBytes };

/** Reads a password: env CARRYON_PASSWORD, a --password-file (`-`: standard input, as the agent's background replicas get it), or a prompt without echo. */
export function passwordSource(opts: { passwordFile?: string }, envName = 'CARRYON_PASSWORD', what = 'Password'): () => Promise<string> {
  let cached: string | null = null;
  return async () => {
    if (cached !== null) return cached;
    if (opts.passwordFile) cached = readFileSync(opts.passwordFile === '-' ? 0 : opts.passwordFile, 'utf8').replace(/\r?\n$/, '');
    else if (process.env[envName]) cached = process.env[envName]!;
    else if (process.stdin.isTTY) cached = await prompt(`${what}: `);
    else throw new CarryonError('no-password', `no password: set ${envName}, use --password-file, or run on a terminal`);
    return cached;
  };
}

function prompt(question: string): Promise<string> {
  let muted = false;
  const out = new Writable({ write: (chunk, _enc, cb) => { if (!muted) process.stderr.write(chunk); cb(); } });
  const rl = createInterface({ input: process.stdin, output: out, terminal: true });
  return new Promise((resolve) => {
    rl.question(question, (answer) => {
      rl.close();
      process.stderr.write('\n');
      resolve(answer);
    });
    muted = true;
  });
}

export function printJsonOr(json: boolean, value: unknown, human: () => void): void {
  if (json) process.stdout.write(`${JSON.stringify(value, null, 2)}\n`);
  else human();
}

/** Plain aligned table for humans. */
export function table(rows: Record<string, unknown>[], columns?: string[]): void {
  if (rows.length === 0) return void process.stdout.write('(none)\n');
  const cols = columns ?? Object.keys(rows[0]!);
  const cell = (v: unknown) => (v === null || v === undefined ? '' : typeof v === 'object' ? JSON.stringify(v) : String(v));
  const widths = cols.map((c) => Math.max(c.length, ...rows.map((r) => cell(r[c]).length)));
  const line = (vals: string[]) => vals.map((v, i) => v.padEnd(widths[i]!)).join('  ').trimEnd();
  process.stdout.write(`${line(cols.map((c) => c.toUpperCase()))}\n${rows.map((r) => line(cols.map((c) => cell(r[c])))).join('\n')}\n`);
}

/** Chunks copied from this laptop's own copies of clones: done work that did not travel, said apart from the fetched ones. */
const copiedHere = (p: Progress) => (p.chunksCopied ? ` fetched + ${p.chunksCopied} copied from this laptop` : '');

/** A progress bar on a terminal (bytes, rate, ETA); a line every few seconds otherwise. */
export function progressReporter(quiet: boolean): { onProgress: (label: string, p: Progress) => void; stop: () => void } {
  if (quiet) return { onProgress: () => undefined, stop: () => undefined };
  if (process.stderr.isTTY) {
    // The percentage is the desktop's data present locally where the transfer says (check-outs: the
    // number `status` and the admin views show), else this run's chunks.
    const bar = new cliProgress.SingleBar({ format: '{label} [{bar}] {percentage}% | {chunks} | {done} | {rate}/s | ETA {eta_formatted}', stream: process.stderr, hideCursor: true }, cliProgress.Presets.shades_classic);
    let started = false;
    return {
      onProgress: (label, p) => {
        const payload = { label, chunks: `${p.chunksDone}/${p.chunksTotal} chunks${copiedHere(p)}`, done: formatBytes(p.bytesDone), rate: formatBytes(p.rate) };
        const [value, total] = p.bytesTotal !== undefined ? [p.bytesLocal ?? 0, p.bytesTotal] : [p.chunksDone, p.chunksTotal];
        if (!started) {
          bar.start(total, value, payload);
          started = true;
        } else bar.update(value, payload);
      },
      stop: () => started && bar.stop(),
    };
  }
  let last = 0;
  return {
    onProgress: (label, p) => {
      if (Date.now() - last < 2000 && p.chunksDone < p.chunksTotal) return;
      last = Date.now();
      const local = p.bytesTotal ? `, ${((100 * (p.bytesLocal ?? 0)) / p.bytesTotal).toFixed(1)}% of the desktop local` : '';
      process.stderr.write(`${label}: ${p.chunksDone}/${p.chunksTotal} chunks${copiedHere(p)}, ${formatBytes(p.bytesDone)}, ${formatBytes(p.rate)}/s${p.etaSeconds !== null ? `, ETA ${Math.ceil(p.etaSeconds)} s` : ''}${local}\n`);
    },
    stop: () => undefined,
  };
}

/** A progress display in bytes (server-side work polled by the CLI, e.g. a desktop import). */
export function byteProgress(label: string, quiet: boolean): { update: (done: number, total: number) => void; stop: () => void } {
  if (quiet) return { update: () => undefined, stop: () => undefined };
  const MiB = 1024 * 1024;
  if (process.stderr.isTTY) {
    const bar = new cliProgress.SingleBar({ format: `${label} [{bar}] {percentage}% | {value}/{total} MiB | ETA {eta_formatted}`, stream: process.stderr, hideCursor: true }, cliProgress.Presets.shades_classic);
    let started = false;
    return {
      update: (done, total) => {
        if (!started) bar.start(Math.ceil(total / MiB), Math.floor(done / MiB));
        else bar.update(Math.floor(done / MiB));
        started = true;
      },
      stop: () => started && bar.stop(),
    };
  }
  let last = 0;
  return {
    update: (done, total) => {
      if (Date.now() - last < 2000 && done < total) return;
      last = Date.now();
      process.stderr.write(`${label}: ${formatBytes(done)} of ${formatBytes(total)}\n`);
    },
    stop: () => undefined,
  };
}
