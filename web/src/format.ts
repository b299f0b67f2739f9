/** Human units, the same the CLI prints: MiB, MB/s, "3 h ago". */
export function bytes(n: number | null | undefined): string {
  if (n === null || n === undefined || !Number.isFinite(n)) return '';
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) {
    n /= 1024;
    i++;
  }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

export function rate(bytesPerSec: number | null | undefined): string {
  if (!bytesPerSec) return '0 MB/s';
  return `${(bytesPerSec / 1e6).toFixed(bytesPerSec < 1e7 ? 2 : 1)} MB/s`;
}

function span(sec: number): string {
  if (sec < 60) return `${Math.round(sec)} s`;
  if (sec < 3600) return `${Math.round(sec / 60)} min`;
  if (sec < 86400 * 2) return `${Math.round(sec / 3600)} h`;
  return `${Math.round(sec / 86400)} d`;
}

export function ago(iso: string | null | undefined): string {
  if (!iso) return 'never';
  const sec = (Date.now() - Date.parse(iso)) / 1000;
  return sec < 5 ? 'just now' : `${span(sec)} ago`;
}

export function left(iso: string | null | undefined): string {
  if (!iso) return '';
  const sec = (Date.parse(iso) - Date.now()) / 1000;
  return sec <= 0 ? 'expired' : `${span(sec)} left`;
}

export function when(iso: string | null | undefined): string {
  return iso ? new Date(iso).toLocaleString() : '';
}
