import type { ChunkId } from '../core/chunk-id.js';

/**
 * Where chunk blobs (and the manifests that list them) live. Blobs are opaque here: the store
 * never sees keys. Implementations: filesystem (default), S3-compatible (scale).
 */
export interface ChunkStore {
  has(id: ChunkId): Promise<boolean>;
  /** The blob exactly as stored, or null when absent. */
  get(id: ChunkId): Promise<Buffer | null>;
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
