import { execFile } from 'node:child_process';
import { open, rename, rm } from 'node:fs/promises';
import { promisify } from 'node:util';
import { openBlob } from '../core/chunks/blob.js';
import { CarryonError } from '../core/errors.js';
import type { LineageKeys } from '../core/keys.js';
import type { Manifest } from '../core/chunks/manifest.js';
import type { ChunkStore } from '../store/chunk-store.js';

const run = promisify(execFile);

export interface ChunkSourceRef {
  store: ChunkStore;
  keys: LineageKeys;
}

/** Plaintext of chunk `index` (zeros for a hole), authenticated. */
export async function readChunkPlain(manifest: Manifest, src: ChunkSourceRef, index: number): Promise<Buffer | null> {
  const id = manifest.chunks[index];
  if (id === null || id === undefined) return null;
  const blob = await src.store.get(id);
  if (!blob) throw new CarryonError('missing-chunk', `chunk ${id} (index ${index}) is not in the store`);
  return openBlob(src.keys, id, blob);
}

/**
 * Re-assembles a disk from its manifest. Raw output is sparse (holes are skipped, not written);
 * qcow2 goes through qemu-img convert. Written to a temp name and renamed when whole.
 */
export async function exportImage(
  manifest: Manifest,
  src: ChunkSourceRef,
  outPath: string,
  opts: { format?: 'raw' | 'qcow2' } = {},
): Promise<void> {
  const format = opts.format ?? 'raw';
  const rawPath = format === 'raw' ? `${outPath}.part` : `${outPath}.raw.part`;
  const fh = await open(rawPath, 'w', 0o600);
  try {
    await fh.truncate(manifest.diskSize);
    for (let i = 0; i < manifest.chunks.length; i++) {
      const plain = await readChunkPlain(manifest, src, i);
      if (plain) await fh.write(plain, 0, plain.length, i * manifest.chunkSize);
    }
    await fh.sync();
  } catch (err) {
    await fh.close();
    await rm(rawPath, { force: true });
    throw err;
  }
  await fh.close();
  if (format === 'raw') return rename(rawPath, outPath);
  try {
    await run('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', rawPath, `${outPath}.part`]);
    await rename(`${outPath}.part`, outPath);
  } catch (err) {
    await rm(`${outPath}.part`, { force: true });
    throw new CarryonError('export-failed', `qemu-img convert failed: ${(err as Error).message}`);
  } finally {
    await rm(rawPath, { force: true });
  }
}
