import { computeChunkId, type ChunkId } from '../../core/chunk-id.js';
import { chunkLength } from '../../core/chunks/chunking.js';
import type { Manifest } from '../../core/chunks/manifest.js';
import { Qcow2Reader } from '../../disk/qcow2/qcow2-reader.js';
import { WriteWindow } from '../../core/write-window.js';
import type { BaseSink } from './fill-direct.js';

/**
 * A local chain whose chunks a check-out may copy instead of fetching them: the parked base of the
 * same desktop (chunks that moved to another index) or a base of another desktop of the same
 * lineage (a clone). Who may be read is decided by the caller (client/vault/local-sources.ts);
 * here every chunk read is checked against the chunk ID it must have before it is written.
 */
export interface ChunkSource {
  /** For the log: "the parked copy of office", "lab (checked out)". */
  label: string;
  /** Chunk ID → the indexes of this source that its manifest says hold it. */
  at: Map<ChunkId, number[]>;
  /** The decrypted guest bytes of chunk `index` (`length` bytes), in `into` when given (a view of it). */
  read(index: number, length: number, into?: Buffer): Promise<Buffer>;
  /** The same file the copies are written into: an index once written is no longer read as a source. */
  sameFileAsTarget?: boolean;
  close(): Promise<void>;
}

/** Chunk ID → indexes, for the chunks of `m` at `usable` indexes (all when null) whose ID `wanted` holds. */
export function chunkIndex(m: Manifest, usable: Iterable<number> | null, wanted: ReadonlySet<ChunkId>): Map<ChunkId, number[]> {
  const at = new Map<ChunkId, number[]>();
  const indexes = usable ?? m.chunks.keys();
  for (const j of indexes) {
    const id = m.chunks[j];
    if (!id || !wanted.has(id)) continue;
    const list = at.get(id) ?? [];
    list.push(j);
    at.set(id, list);
  }
  return at;
}

/** A source over a LUKS qcow2 base read by Node (no image lock: every chunk is checked anyway). */
export async function baseFileSource(o: { label: string; path: string; passphrase: string; diskSize: number; at: Map<ChunkId, number[]>; chunkSize: number; sameFileAsTarget?: boolean }): Promise<ChunkSource> {
  const reader = await Qcow2Reader.open(o.path, o.passphrase);
  if (reader.diskSize !== o.diskSize) {
    await reader.close();
    throw new Error(`its disk is ${reader.diskSize} bytes, its manifest says ${o.diskSize}`);
  }
  return { label: o.label, at: o.at, sameFileAsTarget: o.sameFileAsTarget, read: (index, length, into) => reader.read(index * o.chunkSize, length, into), close: () => reader.close() };
}

/**
 * Chunks read (then written) at a time. Reads of a batch all come before its writes, so chunks
 * swapped between two indexes of one file both survive; a source index written in an earlier batch
 * is not read again (that chunk is fetched instead). 32 × 256 KiB = 8 MiB of plaintext held.
 */
const BATCH = 32;
/** Writes in flight (as a check-out stream keeps two; four here, one reader feeds them all). */
const WRITES_IN_FLIGHT = 4;
/**
 * Reads in flight. One at a time, reads and writes took turns: 12.0 s for a 4 GiB clone's 8192
 * chunks here (the main thread idle 7.4 s of it), against 6.6 s for fetching them all.
 */
const READS_IN_FLIGHT = 4;

/** `fn` over `items`, at most `limit` at once, results in input order. */
async function inOrder<T, R>(items: readonly T[], limit: number, fn: (item: T) => Promise<R>): Promise<R[]> {
  const out: R[] = new Array(items.length);
  let next = 0;
  await Promise.all(Array.from({ length: Math.min(limit, items.length) }, async () => {
    while (next < items.length) {
      const i = next++;
      out[i] = await fn(items[i]!);
    }
  }));
  return out;
}

/**
 * Copies into `sink` every chunk of `target` not in `present` that a source holds: read, checked
 * (length, then HMAC of the plaintext under the lineage's ID key = the chunk ID), written. A chunk no
 * source holds, or whose every local copy fails the check, is left to the transfer (and counted in
 * `rejected`). Returns the indexes written; they are durable once the sink's persist resolves (the
 * caller's, before it records them filled).
 */
export async function copyLocalChunks(o: {
  target: Manifest;
  present: ReadonlySet<number>;
  sources: ChunkSource[];
  sink: BaseSink;
  idKey: Uint8Array;
  log: (line: string) => void;
  signal?: AbortSignal;
  /** Each chunk written (a place of the target): its plaintext bytes, for the progress every view shows. */
  onWritten?: (bytes: number) => void;
}): Promise<{ written: number[]; bytes: number; rejected: number }> {
  // Chunk ID → the target's indexes that need it (a chunk that appears twice is read once).
  const need = new Map<ChunkId, number[]>();
  o.target.chunks.forEach((id, i) => {
    if (!id || o.present.has(i) || !o.sources.some((s) => s.at.has(id))) return;
    const list = need.get(id) ?? [];
    list.push(i);
    need.set(id, list);
  });
  const written: number[] = [];
  const overwritten = new Set<number>();
  // Writes (encrypted and written on the sink's threads) overlap the next batch's reads (decrypted and checked here).
  const writes = new WriteWindow(WRITES_IN_FLIGHT);
  let bytes = 0;
  let rejected = 0;
  const ids = [...need.keys()];
  /** The previous batch's writes being handed to the sink: at most two batches of plaintext are held. */
  let handing: Promise<void> = Promise.resolve();
  try {
    for (let b = 0; b < ids.length; b += BATCH) {
      if (o.signal?.aborted) break;
      // Several reads at once: each waits on the file system's threads, the checks run here as they land.
      const batch = (await inOrder(ids.slice(b, b + BATCH), READS_IN_FLIGHT, async (id) => {
        const places = need.get(id)!;
        const length = chunkLength(places[0]!, o.target.diskSize, o.target.chunkSize);
        // Read straight into a buffer of the sink's, where it lends one (the writer threads' slots: no copy there).
        const into = o.sink.spare?.() ?? undefined;
        const plain = await readChecked(o.sources, id, length, overwritten, o.idKey, (why) => {
          rejected++;
          o.log(`a local copy of chunk ${id.slice(0, 12)}… was not used (${why}): it is fetched instead`);
        }, into);
        if (!plain && into) o.sink.giveBack?.(into);
        return plain ? { places, plain } : null;
      })).filter((x) => x !== null);
      await handing;
      // Marked before any write of the batch lands, and before the next batch reads: never read as a source (it may be half written).
      for (const { places } of batch) for (const i of places) overwritten.add(i);
      handing = (async () => {
        for (const { places, plain } of batch) {
          // A sink may take the buffer over: every place but the last gets its own copy.
          for (const [k, i] of places.entries()) {
            const length = plain.length;
            await writes.add(o.sink.write(i, k === places.length - 1 ? plain : Buffer.from(plain)).then(() => o.onWritten?.(length)));
            written.push(i);
            bytes += plain.length;
          }
        }
      })();
      // Awaited at the next batch or at the end; until then a failure must not count as unhandled.
      handing.catch(() => undefined);
    }
  } finally {
    await handing.catch(() => undefined);
  }
  await handing;
  await writes.drain();
  return { written, bytes, rejected };
}

/**
 * Local sources read one chunk at a time, as a reader asks: the backing of a check-out that `run`
 * or `serve` continue asks here before the transfer server (remote-checkpoint.ts). The same guard
 * as copyLocalChunks: a chunk is handed out only when the HMAC of its plaintext under the lineage
 * ID key is the chunk ID asked for; anything else is left to the transfer. Sources are only read.
 */
export class LocalChunkReader {
  /** Chunks (and their plaintext bytes) handed out from local copies. */
  copiedChunks = 0;
  copiedBytes = 0;
  /** Local copies that failed the check (their chunk is fetched instead). */
  rejected = 0;
  private readonly refused = new Set<ChunkId>();

  constructor(private readonly sources: ChunkSource[], private readonly idKey: Uint8Array, private readonly log: (line: string) => void) {}

  /** A source's manifest names `id` (and no copy of it failed the check yet). */
  has(id: ChunkId): boolean {
    return !this.refused.has(id) && this.sources.some((s) => s.at.has(id));
  }

  /** The checked plaintext of `id` (`length` bytes), or null: then it must be fetched. */
  async read(id: ChunkId, length: number): Promise<Buffer | null> {
    if (!this.has(id)) return null;
    const plain = await readChecked(this.sources, id, length, NOTHING_OVERWRITTEN, this.idKey, (why) => {
      this.rejected++;
      this.log(`a local copy of chunk ${id.slice(0, 12)}… was not used (${why}): it is fetched instead`);
    });
    if (!plain) {
      this.refused.add(id);
      return null;
    }
    this.copiedChunks++;
    this.copiedBytes += plain.length;
    return plain;
  }

  async close(): Promise<void> {
    for (const s of this.sources) await s.close().catch(() => undefined);
  }
}

/** Sources read on demand are other desktops' files: nothing this process writes lies under them. */
const NOTHING_OVERWRITTEN: ReadonlySet<number> = new Set();

/** The first local copy of `id` that reads and checks out, or null (each failure reported once). */
async function readChecked(sources: ChunkSource[], id: ChunkId, length: number, overwritten: ReadonlySet<number>, idKey: Uint8Array, reject: (why: string) => void, into?: Buffer): Promise<Buffer | null> {
  for (const s of sources) {
    for (const j of s.at.get(id) ?? []) {
      if (s.sameFileAsTarget && overwritten.has(j)) continue;
      let plain: Buffer;
      try {
        plain = await s.read(j, length, into);
      } catch (err) {
        reject(`${s.label}, index ${j}: ${(err as Error).message}`);
        continue;
      }
      // The guard: bytes on this laptop are used only when they are the chunk the checkpoint names.
      if (computeChunkId(idKey, plain) === id) return plain;
      reject(`${s.label}, index ${j}: its bytes do not match the chunk ID`);
    }
  }
  return null;
}
