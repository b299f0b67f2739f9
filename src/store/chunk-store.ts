import type { ChunkId } from '../core/chunk-id.js';
import type { BlobUse } from './pack-index.js';

/**
 * Where chunk blobs (and the manifests that list them) live. Blobs are opaque here: the store
 * never sees keys. Implementations: filesystem (default), S3-compatible (scale).
 */
export interface ChunkStore {
  has(id: ChunkId): Promise<boolean>;
  /** The blob exactly as stored, or null when absent. */
  get(id: ChunkId): Promise<Buffer | null>;
  /** Several blobs at once, in input order (an object store merges neighbours into one request). */
  getMany?(ids: readonly ChunkId[]): Promise<(Buffer | null)[]>;
  /**
   * Stores a blob; idempotent (a second put of the same ID is a no-op returning false).
   * With `defer`, the blob becomes visible and durable only at the next `sync()` (group commit).
   * The store keeps no reference to `blob` once the promise settles: callers reuse the memory.
   */
  put(id: ChunkId, blob: Uint8Array, opts?: { defer?: boolean }): Promise<boolean>;
  delete(id: ChunkId): Promise<void>;
  list(): AsyncIterable<ChunkId>;
  /** The subset of `ids` the store lacks, in input order, without duplicates. */
  missing(ids: readonly ChunkId[]): Promise<ChunkId[]>;
  /** Makes every deferred put durable and visible. */
  sync(): Promise<void>;
  /** Manifests by content digest (hex SHA-256 of their encoding). */
  putManifest(digest: string, encoded: Uint8Array): Promise<void>;
  getManifest(digest: string): Promise<Buffer | null>;
  /** Total bytes and count of stored blobs (statistics, not hot path). */
  stats(): Promise<{ chunks: number; bytes: number }>;
  close(): Promise<void>;
}

/** Several blobs in input order: the store's own `getMany`, else parallel `get`s. */
export function getBlobs(store: ChunkStore, ids: readonly ChunkId[]): Promise<(Buffer | null)[]> {
  return store.getMany ? store.getMany(ids) : Promise.all(ids.map((id) => store.get(id)));
}

/** A pack file or object: its size and what the index says is still alive in it. */
export interface PackInfo {
  name: string;
  /** Creation time (ms) from the pack's name; null when the name carries none. */
  createdAt: number | null;
  bytes: number;
  liveBytes: number;
  /** This process may still append to it (never compacted or deleted). */
  active: boolean;
}

/**
 * What garbage collection needs from a store on top of `ChunkStore` (the pack and S3 stores).
 * Every blob carries a last-use mark (`touched`, ms): set when it is stored, deduplicated
 * against (`put` of an existing ID) or reported present by `missing`, at most once per
 * `touchSlackMs`. A sweep deletes only blobs whose mark is still older than its cutoff.
 */
export interface CollectableStore extends ChunkStore {
  /** How stale a last-use mark may be (a sweep's cutoff must lie at least this far back). */
  readonly touchSlackMs: number;
  usage(): AsyncIterable<BlobUse>;
  sweep(ids: readonly ChunkId[], cutoff: number): Promise<{ blobs: number; bytes: number }>;
  /** Stops appending to the packs this process has open, so they can be compacted. */
  sealPacks(): Promise<void>;
  packs(): Promise<PackInfo[]>;
  /** Rewrites the live blobs of a pack (as listed by `packs()`) into new packs, then deletes it; bytes freed. */
  compactPack(pack: PackInfo): Promise<{ moved: number; freedBytes: number }>;
  /** Deletes a pack that holds no live blob (crash leftovers, fully swept); bytes freed. */
  dropPack(pack: PackInfo): Promise<number>;
  /** Every stored manifest with its last modification (ms). */
  manifests(): AsyncIterable<{ digest: string; modifiedAt: number }>;
  deleteManifest(digest: string): Promise<void>;
}

export function isCollectable(s: ChunkStore): s is CollectableStore {
  return typeof (s as Partial<CollectableStore>).sweep === 'function' && typeof (s as Partial<CollectableStore>).compactPack === 'function';
}
