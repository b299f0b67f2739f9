import { formatBytes } from './common.js';

/** Human units for admin tables: MiB, MB/s, "3 h ago", "2 d left". */
export const bytes = (n: unknown): string => (typeof n === 'number' && Number.isFinite(n) ? formatBytes(n) : '');

export function rate(bytesPerSec: unknown): string {
  const n = typeof bytesPerSec === 'number' ? bytesPerSec : 0;
  return `${(n / 1e6).toFixed(n > 0 && n < 1e7 ? 2 : 1)} MB/s`;
}

function span(sec: number): string {
  if (sec < 60) return `${Math.round(sec)} s`;
  if (sec < 3600) return `${Math.round(sec / 60)} min`;
  if (sec < 2 * 86400) return `${Math.round(sec / 3600)} h`;
  return `${Math.round(sec / 86400)} d`;
}

export function ago(iso: unknown, now = Date.now()): string {
  if (typeof iso !== 'string' || !iso) return 'never';
  const sec = (now - Date.parse(iso)) / 1000;
  return sec < 5 ? 'just now' : `${span(sec)} ago`;
}

export function left(iso: unknown, now = Date.now()): string {
  if (typeof iso !== 'string' || !iso) return '';
  const sec = (Date.parse(iso) - now) / 1000;
  return sec <= 0 ? 'expired' : `${span(sec)} left`;
}

export const percent = (p: unknown): string => (typeof p === 'number' ? `${p.toFixed(p % 1 ? 1 : 0)}%` : '');

export interface Col<T> {
  /** Header. */
  h: string;
  v: (row: T) => unknown;
  /** Right-aligned (numbers with units). */
  right?: boolean;
}

/** An aligned table; empty cells stay empty, never "undefined" or raw JSON. */
export function renderTable<T>(rows: T[], cols: Col<T>[]): string {
  if (rows.length === 0) return '(none)\n';
  const text = (v: unknown) => (v === null || v === undefined ? '' : Array.isArray(v) ? v.join(', ') : String(v));
  const cells = rows.map((r) => cols.map((c) => text(c.v(r))));
  const widths = cols.map((c, i) => Math.max(c.h.length, ...cells.map((r) => r[i]!.length)));
  const line = (vals: string[]) => vals.map((v, i) => (cols[i]!.right ? v.padStart(widths[i]!) : v.padEnd(widths[i]!))).join('  ').trimEnd();
  return `${[line(cols.map((c) => c.h.toUpperCase())), ...cells.map(line)].join('\n')}\n`;
}

export function printTable<T>(rows: T[], cols: Col<T>[]): void {
  process.stdout.write(renderTable(rows, cols));
}

/** `key: value` lines, aligned. */
export function printFields(fields: [string, unknown][]): void {
  const w = Math.max(...fields.map(([k]) => k.length));
  process.stdout.write(fields.map(([k, v]) => `${`${k}:`.padEnd(w + 2)}${v === null || v === undefined ? '' : String(v)}`).join('\n') + '\n');
}
