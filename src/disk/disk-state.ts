import { constants as fsc } from 'node:fs';
import { mkdir, open, readFile, rename } from 'node:fs/promises';
import { join } from 'node:path';
import { z } from 'zod';
import { decodeManifest, encodeManifest, type Manifest } from '../core/manifest.js';
import { DiskError } from './block-device.js';

/** What survives a restart: the current manifest, the indexes changed vs the base, the base identity. */
export interface DiskState {
  baseDigest: string;
  current: Manifest;
  changed: number[];
}

const STATE_FILE = 'disk-state.json';
const StateJson = z.object({
  version: z.literal(1).optional(),
  baseDigest: z.string().regex(/^[0-9a-f]{64}$/),
  current: z.string(),
  dirty: z.array(z.number().int().nonnegative()),
});

export async function loadDiskState(stateDir: string): Promise<DiskState | null> {
  let text: string;
  try {
    text = await readFile(join(stateDir, STATE_FILE), 'utf8');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return null;
    throw err;
  }
  let parsed: z.infer<typeof StateJson>;
  try {
    parsed = StateJson.parse(JSON.parse(text));
  } catch (err) {
    throw new DiskError('state', `disk state in ${stateDir} is unreadable: ${(err as Error).message}`);
  }
  const current = decodeManifest(Buffer.from(parsed.current, 'base64'));
  for (const i of parsed.dirty) {
    if (i >= current.chunks.length) throw new DiskError('state', `disk state in ${stateDir} lists chunk ${i} beyond the disk`);
  }
  return { baseDigest: parsed.baseDigest, current, changed: parsed.dirty };
}

/** Atomic replace: temp file, fsync, rename, fsync of the directory. */
export async function saveDiskState(stateDir: string, state: DiskState): Promise<void> {
  await mkdir(stateDir, { recursive: true, mode: 0o700 });
  const body = JSON.stringify({
    version: 1,
    baseDigest: state.baseDigest,
    current: encodeManifest(state.current).toString('base64'),
    dirty: state.changed,
  });
  const final = join(stateDir, STATE_FILE);
  const tmp = `${final}.tmp`;
  const fh = await open(tmp, fsc.O_WRONLY | fsc.O_CREAT | fsc.O_TRUNC, 0o600);
  try {
    await fh.writeFile(body);
    await fh.sync();
  } finally {
    await fh.close();
  }
  await rename(tmp, final);
  const dir = await open(stateDir, fsc.O_RDONLY);
  try {
    await dir.sync();
  } finally {
    await dir.close();
  }
}
