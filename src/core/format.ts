/**
 * Human units, the same in the `carryon` command and the web console (which imports this file
 * from its own build): KiB/MiB, MB/s, "3 h ago", "2 d left". Pure: no Node, no DOM.
 */

export function formatBytes(n: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) {
    n /= 1024;
    i++;
  }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

/** Bytes, or an empty cell for anything that is not a finite number. */
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
