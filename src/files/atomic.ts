import { randomBytes } from 'node:crypto';
import { constants as fsc } from 'node:fs';
import { open, rename, stat, unlink } from 'node:fs/promises';

/** Small durable-file helpers shared by the stores and the client home. */

export async function exists(path: string): Promise<boolean> {
  try {
    await stat(path);
    return true;
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return false;
    throw err;
  }
}

/** Writes a new file (never an existing one); `durable` fsyncs it. A failed write leaves no file. */
export async function writeWhole(path: string, data: Uint8Array, durable: boolean): Promise<void> {
  const fh = await open(path, fsc.O_WRONLY | fsc.O_CREAT | fsc.O_EXCL, 0o600);
  try {
    await fh.writeFile(data);
    if (durable) await fh.sync();
  } catch (err) {
    await fh.close();
    await unlink(path).catch(() => undefined);
    throw err;
  }
  await fh.close();
}

/** Atomic replace: temp + fsync + rename. A crash leaves the old or the new file, never half. */
export async function writeFileAtomic(path: string, data: string | Buffer, mode = 0o600): Promise<void> {
  const tmp = `${path}.${randomBytes(4).toString('hex')}.tmp`;
  const fh = await open(tmp, 'w', mode);
  try {
    await fh.writeFile(data);
    await fh.sync();
  } catch (err) {
    await fh.close();
    await unlink(tmp).catch(() => undefined);
    throw err;
  }
  await fh.close();
  await rename(tmp, path);
}

/**
 * fsync (or, with `dataOnly`, fdatasync) of a file or directory by its path: a directory's new
 * entries, or a file another process writes (its dirty pages go to disk; that process's caches stay).
 */
export async function syncPath(path: string, dataOnly = false): Promise<void> {
  const fh = await open(path, 'r');
  try {
    await (dataOnly ? fh.datasync() : fh.sync());
  } finally {
    await fh.close();
  }
}
