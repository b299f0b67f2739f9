import { availableParallelism } from 'node:os';
import { DEFAULT_CHUNK_SIZE, validateChunkSize } from '../core/chunks/chunking.js';
import type { ChunkId } from '../core/chunk-id.js';
import { CarryonError } from '../core/errors.js';
import type { LineageKeys } from '../core/keys.js';
import { createManifest, encodeManifest, manifestDigest, type Manifest } from '../core/chunks/manifest.js';
import type { ChunkStore } from '../store/chunk-store.js';
import { holdStore } from '../store/in-flight.js';
import { SealPool } from './seal-pool.js';
import { openImageSource, type ImageFormat } from './source.js';

export interface ImportOptions {
  store: ChunkStore;
  keys: LineageKeys;
  chunkSize?: number;
  format?: ImageFormat | 'auto';
  /** Sealing workers (default: one per core, at most MAX_IMPORT_WORKERS). */
  workers?: number;
  onProgress?: (p: { bytesDone: number; bytesTotal: number }) => void;
  signal?: AbortSignal;
}

export interface ImportResult {
  /** Sealing workers really used. */
  workers: number;
  manifest: Manifest;
  digest: string;
  bytesRead: number;
  chunksStored: number;
  chunksDeduped: number;
  holes: number;
  bytesStored: number;
}

const BATCH_BYTES = 4 * 1024 * 1024;
/** Past this many sealing threads the main thread (stores, scheduling) becomes the limit. */
export const MAX_IMPORT_WORKERS = 16;

/** One sealing worker per core the process may use, bounded. */
export function defaultImportWorkers(): number {
  return Math.max(1, Math.min(MAX_IMPORT_WORKERS, availableParallelism()));
}
/** Make blobs durable every so often so sync work overlaps reading instead of piling up at the end. */
const SYNC_EVERY_BYTES = 512 * 1024 * 1024;

/**
 * Imports a disk image: read → (workers) zero check, HMAC, zstd, AES-GCM → deferred puts →
 * sync → manifest. Memory stays bounded by the in-flight batches. On failure every blob this
 * import added is removed again and no manifest is written.
 */
export async function importImage(path: string, opts: ImportOptions): Promise<ImportResult> {
  const chunkSize = validateChunkSize(opts.chunkSize ?? DEFAULT_CHUNK_SIZE);
  const batchBytes = Math.max(chunkSize, BATCH_BYTES - (BATCH_BYTES % chunkSize));
  // Until its snapshot commits nothing references what it stores: garbage collection waits.
  const release = holdStore(opts.store);
  let source;
  try {
    source = await openImageSource(path, opts.format ?? 'auto', batchBytes);
  } catch (err) {
    release();
    throw err;
  }
  const workers = Math.max(1, opts.workers ?? defaultImportWorkers());
  const pool = new SealPool(opts.keys, workers);
  // Read-ahead scales with the workers: two batches each, one being sealed and one queued.
  const maxInFlight = Math.max(2, workers * 2);
  const chunks: (ChunkId | null)[] = [];
  const seen = new Set<ChunkId>();
  const added: ChunkId[] = [];
  const stats = { bytesRead: 0, chunksStored: 0, chunksDeduped: 0, holes: 0, bytesStored: 0 };
  const inFlight = new Set<Promise<void>>();
  let sinceSync = 0;
  let failure: unknown = null;

  const storeBatch = async (firstIndex: number, data: Parameters<SealPool['seal']>[0]): Promise<void> => {
    const res = await pool.seal(data, chunkSize);
    const blobs = Buffer.from(res.blobs);
    const puts: Promise<unknown>[] = [];
    res.ids.forEach((id, i) => {
      chunks[firstIndex + i] = id;
      if (id === null) return void stats.holes++;
      if (seen.has(id)) return void stats.chunksDeduped++;
      seen.add(id);
      const blob = blobs.subarray(res.offsets[i]!, res.offsets[i + 1]!);
      puts.push(
        opts.store.put(id, blob, { defer: true }).then((isNew) => {
          if (!isNew) return void stats.chunksDeduped++;
          added.push(id);
          stats.chunksStored++;
          stats.bytesStored += blob.length;
        }),
      );
    });
    await Promise.all(puts);
    pool.recycle(res.blobs);
  };

  try {
    let pending: Buffer[] = [];
    let pendingLen = 0;
    let nextIndex = 0;
    const dispatch = async (data: Parameters<SealPool['seal']>[0]): Promise<void> => {
      // Read the length first: sealing transfers (detaches) the batch's buffer to a worker.
      const length = data.length;
      const p = storeBatch(nextIndex, data);
      nextIndex += Math.ceil(length / chunkSize);
      inFlight.add(p);
      p.then(
        () => inFlight.delete(p),
        (err: unknown) => {
          inFlight.delete(p);
          failure ??= err;
        },
      );
      if (inFlight.size >= maxInFlight) await Promise.race(inFlight);
      if (failure) throw failure;
      sinceSync += length;
      if (sinceSync >= SYNC_EVERY_BYTES) {
        await Promise.all(inFlight);
        await opts.store.sync();
        sinceSync = 0;
      }
    };
    if (source.file) {
      // Raw file: workers read their own ranges, so the main thread only schedules and stores.
      for (let offset = 0; offset < source.size; offset += batchBytes) {
        if (opts.signal?.aborted) throw new CarryonError('aborted', 'import cancelled');
        const length = Math.min(batchBytes, source.size - offset);
        stats.bytesRead += length;
        await dispatch({ file: source.file, offset, length });
        opts.onProgress?.({ bytesDone: stats.bytesRead, bytesTotal: source.size });
      }
    } else for await (const piece of source.stream) {
      if (opts.signal?.aborted) throw new CarryonError('aborted', 'import cancelled');
      stats.bytesRead += piece.length;
      pending.push(piece);
      pendingLen += piece.length;
      if (pendingLen === batchBytes && pending.length === 1 && piece.byteOffset === 0 && piece.byteLength === piece.buffer.byteLength) {
        // Exactly one batch in its own buffer (raw files): hand it to a worker without a copy.
        pending = [];
        pendingLen = 0;
        await dispatch(piece);
        opts.onProgress?.({ bytesDone: stats.bytesRead, bytesTotal: source.size });
        continue;
      }
      while (pendingLen >= batchBytes) {
        const all = pending.length === 1 ? pending[0]! : Buffer.concat(pending, pendingLen);
        const batch = new Uint8Array(batchBytes);
        batch.set(all.subarray(0, batchBytes));
        const rest = all.subarray(batchBytes);
        pending = rest.length ? [Buffer.from(rest)] : [];
        pendingLen = rest.length;
        await dispatch(batch);
      }
      opts.onProgress?.({ bytesDone: stats.bytesRead, bytesTotal: source.size });
    }
    if (pendingLen > 0) await dispatch(new Uint8Array(Buffer.concat(pending, pendingLen)));
    await Promise.all(inFlight);
    if (failure) throw failure;
    if (stats.bytesRead !== source.size) {
      throw new CarryonError('bad-image', `read ${stats.bytesRead} bytes from ${path}, expected ${source.size}`);
    }
    const manifest = createManifest(chunkSize, source.size, chunks.length ? chunks : undefined);
    await opts.store.sync();
    const digest = manifestDigest(manifest);
    await opts.store.putManifest(digest, encodeManifest(manifest));
    return { workers, manifest, digest, ...stats };
  } catch (err) {
    source.close();
    await Promise.allSettled(inFlight);
    // Undo: blobs this import created (deferred or already synced) go away again.
    await Promise.allSettled(added.map((id) => opts.store.delete(id)));
    throw err;
  } finally {
    await pool.close();
    release();
  }
}

