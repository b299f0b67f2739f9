import { readFile } from 'node:fs/promises';
import { z } from 'zod';
import { CarryonError } from '../core/errors.js';

/**
 * A JSON file of this laptop's home, checked against `schema`. One rule for every caller:
 * - a missing file gives `opts.missing`;
 * - a file that exists but cannot be read, is not JSON, or does not match refuses with
 *   `bad-state` (an unreadable one with its own error), unless the caller passes `opts.damaged`.
 *   A caller passes it only where starting from that value loses no data and weakens no check
 *   (a progress cache that is rebuilt, a report for display, a hint that can only restrict);
 *   the reason stands beside the call.
 */
export async function readJsonFile<T, M, D = never>(path: string, schema: z.ZodType<T>, opts: { missing: M; damaged?: D }): Promise<T | M | D> {
  const lenient = 'damaged' in opts;
  let text: string;
  try {
    text = await readFile(path, 'utf8');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return opts.missing;
    if (lenient) return opts.damaged as D;
    throw err;
  }
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch (err) {
    if (lenient) return opts.damaged as D;
    throw new CarryonError('bad-state', `${path} is damaged: ${(err as Error).message}`);
  }
  const parsed = schema.safeParse(value);
  if (parsed.success) return parsed.data;
  if (lenient) return opts.damaged as D;
  throw new CarryonError('bad-state', `${path} is damaged: ${parsed.error.issues[0]?.message ?? 'invalid'}`);
}
