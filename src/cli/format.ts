/** Admin tables: aligned columns of human units (the units themselves are core/format.ts, shared with the web console). */
export { ago, bytes, left, percent, rate } from '../core/format.js';

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
