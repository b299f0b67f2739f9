import { execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { promisify } from 'node:util';
import { mkdir, readdir, readFile, rename, rm, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { parseChunkId, type ChunkId } from '../core/chunk-id.js';
import type { ChunkStore } from './chunk-store.js';
import { exists, syncPath, writeWhole } from '../files/atomic.js';
import { DirBackend } from './backend/dir-backend.js';
import { Manifests } from './manifest-files.js';

const SYNCFS_THRESHOLD = 256;
const execFileP = promisify(execFile);

/** syncfs(2) through coreutils `sync -f` (Node has no binding); false when unavailable. */
async function syncFileSystem(path: string): Promise<boolean> {
  try {
    await execFileP('sync', ['-f', path]);
    return true;
  } catch {
    return false;
  }
}

/**
 * Filesystem chunk store: blobs/ab/cd/<id>, written to tmp/ then fsync + rename, so a visible
 * blob is always whole. Deferred puts are fsynced together at sync() (group commit), which is
 * what makes bulk import fast without ever exposing a half-written blob.
 */
/** A deferred blob: its temp file, and its write (a sync or a read waits for it: the file may still be growing). */
interface Deferred {
  tmp: string;
  written: Promise<void>;
}

export class FsChunkStore implements ChunkStore {
  private readonly pending = new Map<ChunkId, Deferred>();
  /** Deferred blobs a sync() is publishing right now (still readable through their temp path). */
  private readonly syncing = new Map<ChunkId, Deferred>();
  private readonly dirsMade = new Set<string>();
  private readonly manifests: Manifests;

  private constructor(
    readonly root: string,
    manifestFiles: DirBackend,
  ) {
    this.manifests = new Manifests(manifestFiles);
  }

  static async open(root: string): Promise<FsChunkStore> {
    await mkdir(join(root, 'blobs'), { recursive: true });
    return new FsChunkStore(root, await DirBackend.open(root, ['manifests']));
  }

  private blobDir(id: ChunkId): string {
    return join(this.root, 'blobs', id.slice(0, 2), id.slice(2, 4));
  }

  private blobPath(id: ChunkId): string {
    return join(this.blobDir(id), id);
  }

  async has(id: ChunkId): Promise<boolean> {
    parseChunkId(id);
    if (this.pending.has(id) || this.syncing.has(id)) return true;
    return exists(this.blobPath(id));
  }

  async get(id: ChunkId): Promise<Buffer | null> {
    parseChunkId(id);
    const deferred = this.pending.get(id) ?? this.syncing.get(id);
    // A write still in flight is waited for (a failed one left no blob: read on as if absent).
    if (deferred) await deferred.written.catch(() => undefined);
    const pendingPath = deferred?.tmp;
    try {
      return await readFile(pendingPath ?? this.blobPath(id));
    } catch (err) {
      // A sync may have renamed it between the lookup and the read: try the final path.
      if ((err as NodeJS.ErrnoException).code === 'ENOENT' && pendingPath) return this.get(id);
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return null;
      throw err;
    }
  }

  async put(id: ChunkId, blob: Uint8Array, opts: { defer?: boolean } = {}): Promise<boolean> {
    parseChunkId(id);
    if (this.pending.has(id) || this.syncing.has(id) || (await exists(this.blobPath(id)))) return false;
    const tmp = join(this.root, 'tmp', `${id}.${randomBytes(6).toString('hex')}`);
    if (opts.defer) {
      const entry: Deferred = { tmp, written: writeWhole(tmp, blob, false) };
      this.pending.set(id, entry);
      try {
        await entry.written;
      } catch (err) {
        if (this.pending.get(id) === entry) this.pending.delete(id);
        throw err;
      }
      return true;
    }
    await writeWhole(tmp, blob, true);
    await this.ensureDir(this.blobDir(id));
    await rename(tmp, this.blobPath(id));
    return true;
  }

  async sync(): Promise<void> {
    // Each sync publishes what was pending when it started; concurrent syncs take disjoint batches.
    const batch = [...this.pending];
    if (batch.length === 0) return;
    for (const [id, tmp] of batch) {
      this.pending.delete(id);
      this.syncing.set(id, tmp);
    }
    // Another session's put may still be writing its file: waited for; one that failed is not published
    // (its put threw to its own caller). Found by 10 simultaneous pushes to servers sharing a store.
    const settled = await Promise.allSettled(batch.map(([, d]) => d.written));
    const ready = batch.filter(([id], i) => {
      if (settled[i]!.status === 'fulfilled') return true;
      this.syncing.delete(id);
      return false;
    });
    // Make the temp files durable, then publish them by rename. A large batch costs one
    // syncfs(2) (`sync -f`) instead of thousands of fsyncs; a small one fsyncs file by file.
    if (ready.length >= SYNCFS_THRESHOLD && (await syncFileSystem(this.root))) {
      // done for every file at once
    } else await mapLimit(ready, 16, async ([, d]) => syncPath(d.tmp));
    const dirs = new Set<string>();
    for (const [id, { tmp }] of ready) {
      const dir = this.blobDir(id);
      await this.ensureDir(dir);
      await rename(tmp, this.blobPath(id));
      dirs.add(dir);
      this.syncing.delete(id);
    }
    if (dirs.size >= SYNCFS_THRESHOLD && (await syncFileSystem(this.root))) return;
    await mapLimit([...dirs], 16, syncPath);
  }

  async delete(id: ChunkId): Promise<void> {
    parseChunkId(id);
    const deferred = this.pending.get(id);
    this.pending.delete(id);
    await deferred?.written.catch(() => undefined);
    await rm(deferred?.tmp ?? this.blobPath(id), { force: true });
  }

  async *list(): AsyncIterable<ChunkId> {
    const top = await readdir(join(this.root, 'blobs'));
    for (const a of top.sort()) {
      for (const b of (await readdir(join(this.root, 'blobs', a))).sort()) {
        for (const name of (await readdir(join(this.root, 'blobs', a, b))).sort()) yield name;
      }
    }
    for (const id of this.pending.keys()) yield id;
  }

  async missing(ids: readonly ChunkId[]): Promise<ChunkId[]> {
    const unique = [...new Set(ids)];
    const present = await mapLimit(unique, 64, (id) => this.has(id));
    return unique.filter((_, i) => !present[i]);
  }

  putManifest(digest: string, encoded: Uint8Array): Promise<void> {
    return this.manifests.put(digest, encoded);
  }

  getManifest(digest: string): Promise<Buffer | null> {
    return this.manifests.get(digest);
  }

  async stats(): Promise<{ chunks: number; bytes: number }> {
    let chunks = 0;
    let bytes = 0;
    for await (const id of this.list()) {
      chunks++;
      bytes += (await stat(this.pending.get(id)?.tmp ?? this.blobPath(id))).size;
    }
    return { chunks, bytes };
  }

  async close(): Promise<void> {
    await this.sync();
  }

  private async ensureDir(dir: string): Promise<void> {
    if (this.dirsMade.has(dir)) return;
    await mkdir(dir, { recursive: true });
    this.dirsMade.add(dir);
  }
}


/** Runs `fn` over `items` with at most `limit` in flight; results in input order. */
export async function mapLimit<T, R>(items: readonly T[], limit: number, fn: (item: T) => Promise<R>): Promise<R[]> {
  const out = new Array<R>(items.length);
  let next = 0;
  const workers = Array.from({ length: Math.min(limit, items.length) }, async () => {
    while (next < items.length) {
      const i = next++;
      out[i] = await fn(items[i]!);
    }
  });
  await Promise.all(workers);
  return out;
}
