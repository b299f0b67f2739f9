import { existsSync } from 'node:fs';
import { join } from 'node:path';
import type { ChunkStore } from './chunk-store.js';
import { FsChunkStore } from './fs-chunk-store.js';
import { PackChunkStore } from './pack-chunk-store.js';

export type ChunkStoreKind = 'pack' | 'fs';

/**
 * The chunk store in `root`: a directory already holding a file-per-blob store stays one;
 * a new one is a pack store (much faster on ordinary disks: see pack-chunk-store.ts).
 */
export async function openChunkStore(root: string, kind?: ChunkStoreKind): Promise<ChunkStore> {
  const chosen = kind ?? (existsSync(join(root, 'blobs')) ? 'fs' : 'pack');
  return chosen === 'fs' ? FsChunkStore.open(root) : PackChunkStore.open(root);
}
