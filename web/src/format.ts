/** Human units, the same the CLI prints (src/core/format.ts): MiB, MB/s, "3 h ago". */
import { rate as cliRate } from '../../src/core/format';

export { ago, bytes, left } from '../../src/core/format';

/** A transfer with no rate yet reads "0 MB/s". */
export function rate(bytesPerSec: number | null | undefined): string {
  return bytesPerSec ? cliRate(bytesPerSec) : '0 MB/s';
}

export function when(iso: string | null | undefined): string {
  return iso ? new Date(iso).toLocaleString() : '';
}
