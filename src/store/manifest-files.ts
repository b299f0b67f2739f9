import { randomBytes } from 'node:crypto';
import { readdir, readFile, rename, rm, stat, utimes } from 'node:fs/promises';
import { join } from 'node:path';
import { ValidationError } from '../core/errors.js';
import { exists, writeWhole } from '../files/atomic.js';

const DIGEST_RE = /^[0-9a-f]{64}$/;

/** Manifests as files named by digest (few and small): temp + fsync + rename, like blobs. */
export class ManifestFiles {
  constructor(
    private readonly dir: string,
    private readonly tmpDir: string,
  ) {}

  private path(digest: string): string {
    if (!DIGEST_RE.test(digest)) throw new ValidationError(`not a manifest digest: ${digest.slice(0, 80)}`);
    return join(this.dir, digest);
  }

  async put(digest: string, encoded: Uint8Array): Promise<void> {
    const path = this.path(digest);
    if (await exists(path)) {
      // Stored again (a disk back in an earlier state): used now, as garbage collection sees it.
      const now = new Date();
      await utimes(path, now, now).catch(() => undefined);
      return;
    }
    const tmp = join(this.tmpDir, `m-${digest}.${randomBytes(6).toString('hex')}`);
    await writeWhole(tmp, encoded, true);
    await rename(tmp, path);
  }

  /** Every stored manifest with its modification time (ms). */
  async *list(): AsyncIterable<{ digest: string; modifiedAt: number }> {
    for (const name of (await readdir(this.dir)).sort()) {
      if (!DIGEST_RE.test(name)) continue;
      const st = await stat(join(this.dir, name)).catch(() => null);
      if (st) yield { digest: name, modifiedAt: st.mtimeMs };
    }
  }

  async delete(digest: string): Promise<void> {
    await rm(this.path(digest), { force: true });
  }

  async get(digest: string): Promise<Buffer | null> {
    try {
      return await readFile(this.path(digest));
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return null;
      throw err;
    }
  }
}
