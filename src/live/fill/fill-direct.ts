import { join } from 'node:path';
import { z } from 'zod';
import { openBlob } from '../../core/chunks/blob.js';
import type { Piece } from '../../core/chunks/delta.js';
import { openDeltaChain, openDeltaRecord, ZERO_BASE } from '../../core/chunks/delta-record.js';
import type { ChunkId } from '../../core/chunk-id.js';
import { chunkLength } from '../../core/chunks/chunking.js';
import { CarryonError } from '../../core/errors.js';
import type { LineageKeys } from '../../core/keys.js';
import { WriteWindow } from '../../core/write-window.js';
import { zerosAndPieces } from '../../disk/qcow2/subclusters.js';
import { writeFileAtomic } from '../../files/atomic.js';
import { fetchBlobs, TransferFailed, type Progress, type TransferSession } from '../../transfer-client/client.js';
import { pacing, type RateLimiter } from '../../transfer-client/rate-limit.js';
import type { DesktopDisk } from '../disks/disks.js';
import { readJsonFile } from '../../files/json-file.js';

/** Chunk indexes, checked in one pass: a 4 GiB disk lists 16384, which zod's per-element schema took 6–26 ms to check, on every read. */
const isIndexList = (value: unknown): value is number[] => Array.isArray(value) && value.every((i) => Number.isSafeInteger(i) && i >= 0);
const Filled = z.object({ v: z.literal(1), chunks: z.custom<number[]>(isIndexList, 'a list of chunk indexes') });

/** Chunk indexes of a base made durable so far (written only after an NBD flush). */
export async function readFilled(dir: string): Promise<Set<number>> {
  // Damaged: start over; the chunks are fetched and written again, with the same bytes.
  const filled = await readJsonFile(join(dir, 'filled.json'), Filled, { missing: null, damaged: null });
  return new Set(filled?.chunks);
}

/** Records `chunks` as durable: only after the sink's persist covered every one of them. */
export async function writeFilled(dir: string, chunks: Iterable<number>): Promise<void> {
  await writeFileAtomic(join(dir, 'filled.json'), JSON.stringify({ v: 1, chunks: [...chunks] }));
}

/** A chunk that failed authentication on every try: the snapshot (or the path to it) is damaged, not the link. */
export class ChunkFailedAuthentication extends CarryonError {
  constructor(readonly chunkId: ChunkId, readonly detail: string) {
    super('damaged-snapshot', `chunk ${chunkId.slice(0, 12)}… failed authentication 3 times (${detail})`);
  }
}

/** Where a base's chunks go: the Node writer (qcow2-base-writer.ts) or QEMU's NBD export of the base. */
export interface BaseSink {
  /** Writes chunk `index` of the disk (its plaintext; the sink encrypts and may take the buffer over). */
  write(index: number, plain: Buffer): Promise<void>;
  /** A buffer to open the next chunk into (one an earlier write is done with), or null: saves an allocation per chunk. */
  spare?(): Buffer | null;
  /** A `spare` buffer that will not be written after all (its chunk failed authentication). */
  giveBack?(buf: Buffer): void;
  /**
   * Writes pieces of chunk `index` over the chunk it holds there (a delta record's pages, plaintext):
   * only where that chunk is present. A sink without it is never sent deltas.
   */
  writePieces?(index: number, pieces: readonly Piece[]): Promise<void>;
  /**
   * Writes chunk `index` as zeros with `pieces` over them, whatever it held (pages over a hole):
   * a sink that can leave the zeros unwritten (qcow2 subclusters). Without it the whole chunk is written.
   */
  writeOverZeros?(index: number, length: number, pieces: readonly Piece[]): Promise<void>;
  /** Everything written before the call is durable (and mapped) when it resolves. */
  persist(): Promise<unknown>;
  close(): Promise<void>;
}

/**
 * Check-out with no VM attached: blobs come over the transfer's parallel streams, each is
 * authenticated (GCM, with the chunk ID in the AAD), and its plaintext is written into the base
 * through its sink. Holes are never written: a base without backing reads them as zeros.
 * Progress is durable in groups (sink persist, then `filled.json`): a group is made durable every
 * second or every PERSIST_BYTES written, whichever comes first, in the background while the streams
 * go on, so a kill -9 or a power cut loses at most the last second's chunks. A chunk is marked only
 * after its write finished and the sink's persist (data synced, then mapped) covered it: a torn or
 * unsynced chunk is never counted and is fetched again. Chunks a running desktop streamed in the
 * meantime are simply written again, with the same bytes.
 */
export async function fillDirect(opts: {
  /** Only each disk's checkpoint manifest is read (a datacenter host has no vault entry). */
  disks: { disk: Pick<DesktopDisk, 'base'>; dir: string; sink: BaseSink;
    /** The chunk the base still holds at an index it lacks (a parked copy's): the server may send the pages that differ. */
    bases?: ReadonlyMap<number, ChunkId> }[];
  session: TransferSession;
  keys: LineageKeys;
  signal?: AbortSignal;
  rateLimit?: RateLimiter;
  onProgress?: (p: Progress) => void;
}): Promise<{ bytesMoved: number; chunksMoved: number }> {
  const targets = new Map<ChunkId, { sink: BaseSink; length: number; disk: number; index: number; base: ChunkId | null }[]>();
  const sinks = opts.disks.map((d) => d.sink);
  const filled: Set<number>[] = [];
  let total = 0;
  // Data bytes (holes not counted) present locally and in all: the percentage status and the broker show.
  let bytesLocal = 0;
  let bytesTotal = 0;
  // The sinks are the caller's (opened and closed there): a retry goes on with the same ones.
  for (const [d, { disk, dir, sink, bases }] of opts.disks.entries()) {
    const done = await readFilled(dir);
    filled.push(done);
    const m = disk.base;
    m.chunks.forEach((id, index) => {
      if (!id) return;
      const length = chunkLength(index, m.diskSize, m.chunkSize);
      bytesTotal += length;
      if (done.has(index)) return void (bytesLocal += length);
      const list = targets.get(id) ?? [];
      // Pages over a kept chunk go in whole sectors: not for a chunk whose length is not (the last of an odd-sized disk).
      // Pages over zeros make the whole chunk here: any sink takes that.
      const held = bases?.get(index) ?? null;
      const base = held === ZERO_BASE || (sink.writePieces && length % 512 === 0) ? held : null;
      list.push({ sink, length, disk: d, index, base });
      targets.set(id, list);
      total++;
    });
  }
  const ids = [...targets.keys()];
  const started = Date.now();
  opts.onProgress?.({ bytesDone: 0, chunksDone: 0, chunksTotal: total, rate: 0, etaSeconds: null, bytesLocal, bytesTotal });
  let bytesMoved = 0;
  let chunksMoved = 0;
  // The first failure (a stream's, or a group's persist) stops every stream; none is still writing when the clients close.
  let stop: { error: unknown } | null = null;
  let sinceFlush = 0;
  let lastFlush = Date.now();
  let flushing: Promise<void> | null = null;
  const pendingMarks: { disk: number; index: number }[] = [];
  const persist = async () => {
    // Marks taken before the sinks' persist: each of them was written before it began, so it is covered.
    const marks = pendingMarks.splice(0);
    await Promise.all(sinks.map((s) => s.persist()));
    for (const m of marks) filled[m.disk]!.add(m.index);
    await Promise.all(opts.disks.map(({ dir }, d) => writeFilled(dir, filled[d]!)));
    testHooks.afterPersist?.(filled.reduce((n, f) => n + f.size, 0));
  };
  /** Starts a group in the background when one is due (not between batches only: a batch may take minutes on a slow link). */
  const maybePersist = () => {
    if (flushing || pendingMarks.length === 0) return;
    if (sinceFlush < PERSIST_BYTES && Date.now() - lastFlush < PERSIST_MS) return;
    sinceFlush = 0;
    lastFlush = Date.now();
    flushing = persist().catch((error: unknown) => void (stop ??= { error })).finally(() => (flushing = null));
  };
  /** Once a chunk's writes to every place landed: its marks wait for the next durable group (`bytes` written per place). */
  const written = (places: readonly { disk: number; index: number }[], writing: Promise<unknown>, bytes: number) => writing.then(() => {
    for (const p of places) pendingMarks.push({ disk: p.disk, index: p.index });
    sinceFlush += bytes * places.length;
    maybePersist();
  });
  let next = 0;
  const paced = pacing(opts.rateLimit, opts.disks[0]?.disk.base.chunkSize ?? 256 * 1024, Math.max(1, opts.session.endpoint.maxStreams), 32);
  const batch = paced.batch;
  const failures = new Map<ChunkId, number>();
  /** Chunks whose delta record failed its check: fetched whole from then on. */
  const wholeOnly = new Set<ChunkId>();
  /** The base every place of `id` holds (the same one everywhere), else null: pages only where they fit all. */
  const deltaBase = (id: ChunkId): ChunkId | null => {
    const places = targets.get(id);
    const base = places?.[0]?.base ?? null;
    return base && !wholeOnly.has(id) && places!.every((p) => p.base === base) ? base : null;
  };
  const worker = async () => {
    const writes = new WriteWindow(WRITES_PER_STREAM);
    try {
      await stream(writes);
    } catch (error) {
      stop ??= { error };
    } finally {
      await writes.drain().catch(() => undefined);
    }
  };
  const stream = async (writes: WriteWindow) => {
    while (next < ids.length && !stop) {
      if (opts.signal?.aborted) throw new CarryonError('aborted', 'check-out paused');
      const want = ids.slice(next, next + batch);
      next += batch;
      let queue = want;
      for (let attempt = 0; queue.length; attempt++) {
        const seen = new Set<ChunkId>();
        const have = queue.map(deltaBase);
        for await (const { id, blob, delta } of fetchBlobs(opts.session, queue, opts.signal, have.some(Boolean) ? have : undefined)) {
          if (stop) return;
          const places = targets.get(id);
          if (!places || seen.has(id)) continue;
          if (delta) {
            // The pages that make this chunk from the base each place holds (one record, or a chain's pages as one set):
            // authenticated (each record's MAC binds its pair), then written over it.
            const base = deltaBase(id);
            let pages: { length: number; pieces: Piece[] };
            try {
              if (!base) throw new Error('sent as pages against no base of ours');
              pages = delta === 'record' ? openDeltaRecord(opts.keys, base, id, blob) : openDeltaChain(opts.keys, base, id, blob);
              if (pages.length !== places[0]!.length) throw new Error(`chunk has ${pages.length} bytes, expected ${places[0]!.length}`);
            } catch {
              // A bad record costs bytes, not the check-out: this chunk is asked for whole.
              wholeOnly.add(id);
              continue;
            }
            seen.add(id);
            // Over a hole: zeros and the pages are the whole chunk (a sink with subclusters writes only the pages' ones). Over a kept chunk: the pages alone.
            const write = base === ZERO_BASE
              ? (p: (typeof places)[number]) => p.sink.writeOverZeros
                ? p.sink.writeOverZeros(p.index, pages.length, pages.pieces)
                : p.sink.write(p.index, zerosAndPieces(p.sink.spare?.() ?? null, pages.length, pages.pieces))
              : (p: (typeof places)[number]) => p.sink.writePieces!(p.index, pages.pieces);
            await writes.add(written(places, Promise.all(places.map(write)), base === ZERO_BASE ? pages.length : pages.pieces.reduce((n, p) => n + p.bytes.length, 0)));
          } else {
            let plain: Buffer;
            const into = places[0]!.sink.spare?.() ?? undefined;
            try {
              // No second hash of the plaintext: the tag binds it to this ID under the lineage key, and
              // every blob was checked against its ID where it entered the datacenter (import, push).
              plain = openBlob(opts.keys, id, blob, { checkId: false, into });
              if (plain.length !== places[0]!.length) throw new Error(`chunk has ${plain.length} bytes, expected ${places[0]!.length}`);
            } catch (err) {
              if (into) places[0]!.sink.giveBack?.(into);
              failures.set(id, (failures.get(id) ?? 0) + 1);
              if ((failures.get(id) ?? 0) >= 3) throw new ChunkFailedAuthentication(id, (err as Error).message);
              continue;
            }
            seen.add(id);
            // Several writes in flight per stream (the storage daemon encrypts on its thread pool; the file writes overlap).
            // A sink may take the buffer over: the first place (whose sink lent it) gets it, every other
            // place its own copy, all made before any write's first await (a sink reads, never changes, what it is given).
            const copies = places.map((_, i) => (i === 0 ? plain : Buffer.from(plain)));
            await writes.add(written(places, Promise.all(places.map((p, i) => p.sink.write(p.index, copies[i]!))), places[0]!.length));
          }
          await opts.rateLimit?.take(blob.length, opts.signal);
          bytesMoved += blob.length;
          chunksMoved += places.length;
          testHooks.afterChunk?.(chunksMoved);
          bytesLocal += places.length * places[0]!.length;
          const secs = (Date.now() - started) / 1000;
          const rate = secs > 0 ? bytesMoved / secs : 0;
          opts.onProgress?.({ bytesDone: bytesMoved, chunksDone: chunksMoved, chunksTotal: total, rate, etaSeconds: chunksMoved ? ((total - chunksMoved) / chunksMoved) * secs : null, bytesLocal, bytesTotal });
        }
        queue = queue.filter((id) => !seen.has(id));
        if (queue.length && attempt >= 3) throw new TransferFailed(`${queue.length} chunks did not arrive`);
      }
      await writes.drain();
      maybePersist();
    }
  };
  try {
    await Promise.all(Array.from({ length: paced.streams }, worker));
    if (stop) throw (stop as { error: unknown }).error;
  } finally {
    await flushing;
    await persist().catch(() => undefined);
  }
  if (stop) throw (stop as { error: unknown }).error;
  return { bytesMoved, chunksMoved };
}

/**
 * Writes kept in flight per transfer stream. Two, not more: each holds a chunk's plaintext, and
 * plaintext kept alive across a young-generation GC is promoted, so a deeper window cost
 * 1.5–2 s of full GCs per 2 GiB check-out here and no wall time (measured 2 vs 8).
 */
const WRITES_PER_STREAM = 2;

/** A durable group at least this often: what a kill -9 or a power cut may cost, in time... */
const PERSIST_MS = 1000;
/** ...and in bytes written (one sync per 8 MiB costs little beside the writes themselves). */
const PERSIST_BYTES = 8 * 1024 * 1024;

/**
 * Test-only observation points (the resume tests kill the process at a chosen one); set from
 * CARRYON_TEST_SIGKILL_AFTER_CHUNKS (chunks received by this run) or _FILLED (chunks recorded durable, all
 * runs) under NODE_ENV=test, so a child process is killed at a chosen point, other writes in flight.
 */
export const testHooks: { afterChunk?: (chunksDone: number) => void; afterPersist?: (chunksFilled: number) => void } = {};
if (process.env.NODE_ENV === 'test') {
  const atChunk = Number(process.env.CARRYON_TEST_SIGKILL_AFTER_CHUNKS);
  if (atChunk > 0) testHooks.afterChunk = (n) => n >= atChunk && process.kill(process.pid, 'SIGKILL');
  const atFilled = Number(process.env.CARRYON_TEST_SIGKILL_AFTER_FILLED);
  if (atFilled > 0) testHooks.afterPersist = (n) => n >= atFilled && process.kill(process.pid, 'SIGKILL');
}

