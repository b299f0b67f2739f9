import { existsSync } from 'node:fs';
import { join } from 'node:path';
import type { ChunkStore } from './chunk-store.js';
import { FsChunkStore } from './fs-chunk-store.js';
import { PackChunkStore, type PackStoreOptions } from './pack-chunk-store.js';
import { S3ChunkStore } from './s3-chunk-store.js';
import { isS3Url, parseS3Url } from './s3-config.js';

export type ChunkStoreKind = 'pack' | 'fs';

export interface OpenStoreOptions extends PackStoreOptions {
  /**
   * Pack index of an S3 store whose URL names none: an SQLite file (the broker's data directory)
   * or a postgres:// URL (the broker's database, when it runs on PostgreSQL).
   */
  s3IndexPath?: string;
}

/**
 * The chunk store at `location`: an `s3://bucket/prefix?endpoint=…` URL is an S3 store (see
 * s3-config.ts); a directory already holding a file-per-blob store stays one; a new directory is
 * a pack store (much faster on ordinary disks: see pack-chunk-store.ts).
 */
export async function openChunkStore(location: string, kind?: ChunkStoreKind, opts: OpenStoreOptions = {}): Promise<ChunkStore> {
  if (isS3Url(location)) return S3ChunkStore.open(parseS3Url(location, { indexPath: opts.s3IndexPath }), opts);
  const chosen = kind ?? (existsSync(join(location, 'blobs')) ? 'fs' : 'pack');
  return chosen === 'fs' ? FsChunkStore.open(location) : PackChunkStore.open(location, opts);
}

/** The location as safe to print (an S3 URL keeps bucket, prefix and endpoint; it holds no secrets). */
export function describeStore(location: string): string {
  return isS3Url(location) ? location.split('?')[0]! : location;
}
