import { join } from 'node:path';
import { CarryonError } from '../core/errors.js';
import { S3Backend } from './backend/s3-backend.js';
import { isPostgresUrl, PgPackIndex } from './pg-pack-index.js';
import { SqlitePackIndex, type PackIndex } from './pack-index.js';
import { PackRepository, type PackRepositoryOptions } from './pack-repository.js';
import type { S3StoreConfig } from './s3-config.js';

export interface S3StoreOptions extends Pick<PackRepositoryOptions, 'touchSlackMs' | 'packMaxAgeMs'> {
  /** A ready index (tests, or a shared database); else SQLite or PostgreSQL at config.indexPath. */
  index?: PackIndex;
}

/**
 * Chunk store on an S3-compatible object store: the chunk repository (pack-repository.ts) over
 * an S3 bucket (backend/s3-backend.ts). A pack is filled in memory and uploaded as one object
 * when full or at `sync()`; its blobs are published by the index commit that follows the upload.
 * The index is shared by every broker and transfer server writing the bucket (PostgreSQL, or an
 * SQLite file for one process).
 */
export class S3ChunkStore extends PackRepository {
  private constructor(
    readonly config: S3StoreConfig,
    backend: S3Backend,
    index: PackIndex,
    opts: S3StoreOptions,
  ) {
    super(backend, index, { touchSlackMs: opts.touchSlackMs, packMaxAgeMs: opts.packMaxAgeMs, packBytes: config.packBytes, writers: 1 });
  }

  static async open(config: S3StoreConfig, opts: S3StoreOptions = {}): Promise<S3ChunkStore> {
    const backend = await S3Backend.open(config);
    try {
      if (!opts.index && !config.indexPath) throw new CarryonError('bad-config', 'an S3 chunk store needs a pack index: add index=/path/to/index.sqlite (or index=postgres://…, URL-encoded) to the URL');
      const index = opts.index ?? (isPostgresUrl(config.indexPath!) ? await PgPackIndex.open(config.indexPath!) : SqlitePackIndex.open(config.indexPath!));
      return new S3ChunkStore(config, backend, index, opts);
    } catch (err) {
      await backend.close();
      throw err;
    }
  }
}

/** Default place of the S3 store's SQLite pack index next to a data directory. */
export function defaultS3IndexPath(dataDir: string): string {
  return join(dataDir, 's3-pack-index.sqlite');
}
