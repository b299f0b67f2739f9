/**
 * Phase timings for the benches (CARRYON_TRACE=1): where a command's fixed costs go (module
 * loading, login, vault key, storage daemon, begin, push, commit…). Off by default: nothing is
 * recorded and nothing printed; on, each span goes to stderr as `carryon-trace NAME START DUR`
 * (milliseconds since the process started) when it ends, so it never mixes with stdout.
 */
const printing = process.env.CARRYON_TRACE === '1';
let enabled = printing;

/** An in-process bench records spans without the variable (and without printing them): takeTrace reads them. */
export function recordTrace(on: boolean): void {
  enabled = printing || on;
}

export interface TraceSpan { name: string; startMs: number; ms: number }

const spans: TraceSpan[] = [];

/** Runs `fn` as the span `name` (spans may overlap: work started side by side). */
export async function traced<T>(name: string, fn: () => Promise<T>): Promise<T> {
  if (!enabled) return fn();
  const start = performance.now();
  try {
    return await fn();
  } finally {
    traceSpan(name, start);
  }
}

/** Ends the span `name` begun at `start` (a `performance.now()` value). */
export function traceSpan(name: string, start: number): void {
  if (!enabled) return;
  const span = { name, startMs: start, ms: performance.now() - start };
  spans.push(span);
  if (printing) process.stderr.write(`carryon-trace ${name} ${span.startMs.toFixed(1)} ${span.ms.toFixed(1)}\n`);
}

/** A figure that is not a span (the process's CPU time): printed as a span of that length starting at 0. */
export function traceValue(name: string, ms: number): void {
  if (!enabled) return;
  spans.push({ name, startMs: 0, ms });
  if (printing) process.stderr.write(`carryon-trace ${name} 0 ${ms.toFixed(1)}\n`);
}

/** The spans recorded in this process so far, and forgets them (an in-process bench reads each run's). */
export function takeTrace(): TraceSpan[] {
  return spans.splice(0);
}

/** Parses the `carryon-trace` lines of a child's stderr. */
export function parseTrace(stderr: string): TraceSpan[] {
  const out: TraceSpan[] = [];
  for (const m of stderr.matchAll(/^carryon-trace (\S+) ([\d.]+) ([\d.]+)$/gm)) out.push({ name: m[1]!, startMs: Number(m[2]), ms: Number(m[3]) });
  return out;
}
