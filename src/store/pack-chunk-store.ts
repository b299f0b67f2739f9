import { availableParallelism } from 'node:os';
import { join } from 'node:path';
import { DirBackend } from './backend/dir-backend.js';
import { SqlitePackIndex } from './pack-index.js';
import { PackRepository, type PackRepositoryOptions } from './pack-repository.js';

/**
 * Pack store: the chunk repository (pack-repository.ts) in a directory, its index in SQLite
 * (`index.sqlite`, WAL, shared by the processes that write the store).
 *
 * One file per blob costs a file creation, a rename and an fsync per 256 KiB; on an ordinary
 * ext4 laptop disk that, not crypto, bounded check-out and import. Here a group commit is: append
 * the blobs (page cache), fdatasync the pack, then one index transaction.
 */
const PACK_LIMIT = 1024 ** 3;

export type PackStoreOptions = Omit<PackRepositoryOptions, 'packBytes'>;

/** One pack writer per four cores (1 on a laptop), at most 4: fdatasyncs of a group commit run side by side. */
export function defaultPackWriters(): number {
  return Math.max(1, Math.min(4, Math.floor(availableParallelism() / 4)));
}

export class PackChunkStore extends PackRepository {
  private constructor(
    readonly root: string,
    backend: DirBackend,
    index: SqlitePackIndex,
    opts: PackStoreOptions,
  ) {
    super(backend, index, { ...opts, packBytes: PACK_LIMIT, writers: opts.writers ?? defaultPackWriters() });
  }

  static async open(root: string, opts: PackStoreOptions = {}): Promise<PackChunkStore> {
    const backend = await DirBackend.open(root);
    return new PackChunkStore(root, backend, SqlitePackIndex.open(join(root, 'index.sqlite')), opts);
  }
}
