import { randomBytes } from 'node:crypto';
import { parseChunkId, type ChunkId } from '../core/chunk-id.js';
import { CarryonError } from '../core/errors.js';
import type { Backend, PackSink } from './backend/backend.js';
import type { CollectableStore, PackInfo } from './chunk-store.js';
import { Manifests } from './manifest-files.js';
import { readMerged } from './merged-reads.js';
import { type BlobUse, checkRecord, encodeRecord, packCreatedAt, packWriterPid, RECORD_HEAD, type Location, type PackIndex } from './pack-index.js';

/** Compaction reads and rewrites this many records at a time (memory: about this × 256 KiB). */
const COMPACT_BATCH = 256;

export interface PackRepositoryOptions {
  /** A pack takes no more records once this big (a record larger than that gets a pack alone). */
  packBytes: number;
  /** Packs appended to side by side (more than one when many import workers write to a disk). */
  writers?: number;
  /** A `missing`/duplicate `put` re-marks a blob as used at most this often (GC grace must exceed it). */
  touchSlackMs?: number;
  /** No pack takes appends for longer than this; another process's pack younger than twice this may still grow (or not be indexed yet): GC leaves it alone. */
  packMaxAgeMs?: number;
}

interface Entry {
  id: ChunkId;
  offset: number;
  length: number;
  /** The record reached the pack (the page cache, or the pack's memory). */
  written: Promise<void>;
  /** Compaction: the blob is published at `from` and moves here. */
  from?: Location;
}

/** A pack this process writes, or whose blobs it has not published yet. */
interface OpenPack {
  name: string;
  createdAt: number;
  sink: PackSink | null;
  size: number;
  /** Records not yet published by an index commit. */
  entries: Entry[];
  /** Takes no more records. */
  sealed: boolean;
}

/**
 * The chunk repository: blobs appended to packs in a backend (a directory, an S3 bucket),
 * located through a pack index (SQLite or PostgreSQL). One writer, reader and compactor for every
 * backend, as restic's `repository` over its `backend`.
 *
 * Group commit: records are appended to packs; `sync()` makes the packs durable (an fdatasync
 * of a file, the upload of an object), then publishes their records in one index transaction.
 * A blob is visible to other processes only once its index row is committed, and that happens
 * only after its bytes are durable, so a crash leaves at most unindexed bytes or a pack no row
 * names (wasted, never wrong): garbage collection drops them later.
 *
 * Several processes may write one store (the laptop's `checkout` filling the vault while `serve`
 * writes new blobs; brokers and transfer servers on one bucket): each appends only to packs it
 * created, named `<ms>-<pid>-<random>.pack`; the index is shared. A process never appends to a
 * pack older than `packMaxAgeMs`, so garbage collection may compact or delete another's pack
 * older than twice that, and this process's own sealed packs at once.
 */
export class PackRepository implements CollectableStore {
  /** Blobs put here and not yet published, by id. */
  private readonly pending = new Map<ChunkId, { pack: OpenPack; entry: Entry }>();
  /** Packs this process writes or still publishes: never compacted or dropped. */
  private readonly open = new Set<OpenPack>();
  private readonly slots: (OpenPack | null)[];
  private readonly opening: (Promise<void> | null)[];
  private nextSlot = 0;
  private lastSync: Promise<void> = Promise.resolve();
  private readonly manifestStore: Manifests;
  readonly touchSlackMs: number;
  private readonly packMaxAgeMs: number;
  private readonly packBytes: number;

  constructor(
    protected readonly backend: Backend,
    protected readonly index: PackIndex,
    opts: PackRepositoryOptions,
  ) {
    const n = Math.max(1, Math.min(16, opts.writers ?? 1));
    this.slots = new Array<OpenPack | null>(n).fill(null);
    this.opening = new Array<Promise<void> | null>(n).fill(null);
    this.touchSlackMs = opts.touchSlackMs ?? 10 * 60_000;
    this.packMaxAgeMs = opts.packMaxAgeMs ?? 3600_000;
    this.packBytes = opts.packBytes;
    this.manifestStore = new Manifests(backend);
  }

  async has(id: ChunkId): Promise<boolean> {
    parseChunkId(id);
    return this.pending.has(id) || (await this.index.get(id)) !== null;
  }

  async get(id: ChunkId): Promise<Buffer | null> {
    parseChunkId(id);
    const p = this.pending.get(id);
    if (p) return this.readPending(id, p);
    for (let attempt = 0; ; attempt++) {
      const loc = await this.index.get(id);
      if (!loc) return null;
      const record = await this.readPack(loc, RECORD_HEAD + loc.length);
      // Gone: compaction moved the blob and deleted its old pack between the lookup and the read.
      if (record || attempt > 0) return checkRecord(record, id, loc);
    }
  }

  private async readPending(id: ChunkId, { pack, entry }: { pack: OpenPack; entry: Entry }): Promise<Buffer> {
    await entry.written;
    const loc = { pack: pack.name, offset: entry.offset, length: entry.length };
    return checkRecord(await pack.sink!.read(entry.offset, RECORD_HEAD + entry.length), id, loc);
  }

  /** Bytes of a pack the index names; a name it could not have written is damage, not a path. */
  private readPack(loc: { pack: string; offset: number }, length: number): Promise<Buffer | null> {
    if (packCreatedAt(loc.pack) === null) throw new CarryonError('store-corrupt', `index names an invalid pack ${loc.pack.slice(0, 80)}`);
    return this.backend.read('packs', loc.pack, loc.offset, length);
  }

  /**
   * Blobs in input order. Records close to each other in one pack (a check-out asks for chunks
   * in disk order, which is how an import wrote them) come back in one read, as close as the
   * backend finds worth it.
   */
  async getMany(ids: readonly ChunkId[]): Promise<(Buffer | null)[]> {
    const out = new Array<Buffer | null>(ids.length).fill(null);
    const wanted: { i: number; id: ChunkId; loc: Location }[] = [];
    for (const [i, id] of ids.entries()) {
      parseChunkId(id);
      const p = this.pending.get(id);
      if (p) out[i] = await this.readPending(id, p);
      else {
        const loc = await this.index.get(id);
        if (loc) wanted.push({ i, id, loc });
      }
    }
    const records = await this.readRecords(wanted);
    // Compacted away meanwhile: look it up again.
    for (const [k, w] of wanted.entries()) out[w.i] = records[k] ?? (await this.get(w.id));
    return out;
  }

  /** Published records, merged into ranges per the backend; null where the pack is gone. */
  private readRecords(items: readonly { id: ChunkId; loc: Location }[]): Promise<(Buffer | null)[]> {
    return readMerged(items, this.backend.mergeReads, (loc, length) => this.readPack(loc, length));
  }

  async put(id: ChunkId, blob: Uint8Array, opts: { defer?: boolean } = {}): Promise<boolean> {
    if (await this.has(id)) {
      await this.touch([id]);
      return false;
    }
    const { pack, entry } = await this.append(encodeRecord(id, blob), { id, length: blob.length });
    this.pending.set(id, { pack, entry });
    try {
      await entry.written;
    } catch (err) {
      this.forget(pack, entry);
      throw err;
    }
    if (!opts.defer) await this.sync();
    return true;
  }

  /**
   * Appends a whole record to one of this process's packs (round robin, created on first write;
   * a new one past the size or age limit). The offset is reserved and the write begun in the
   * same turn as the check, so no record lands in a pack another append has just sealed.
   */
  private async append(record: Buffer, e: Pick<Entry, 'id' | 'length' | 'from'>): Promise<{ pack: OpenPack; entry: Entry }> {
    const slot = this.nextSlot++ % this.slots.length;
    for (;;) {
      const pack = this.slots[slot];
      if (pack && (pack.size === 0 || pack.size + record.length <= this.packBytes) && Date.now() - pack.createdAt < this.packMaxAgeMs) {
        const entry: Entry = { ...e, offset: pack.size, written: pack.sink!.write(record, pack.size) };
        entry.written.catch(() => undefined); // reported by the put; the sync leaves the record out
        pack.size += record.length;
        pack.entries.push(entry);
        if (pack.size >= this.packBytes) this.seal(pack);
        return { pack, entry };
      }
      if (pack) this.seal(pack);
      this.opening[slot] ??= this.createPack(slot).finally(() => (this.opening[slot] = null));
      await this.opening[slot];
    }
  }

  private async createPack(slot: number): Promise<void> {
    const createdAt = Date.now();
    const pack: OpenPack = { name: `${createdAt.toString(36)}-${process.pid}-${randomBytes(4).toString('hex')}.pack`, createdAt, sink: null, size: 0, entries: [], sealed: false };
    this.open.add(pack); // ours from before it exists: GC never drops it under our feet
    try {
      pack.sink = await this.backend.createPack(pack.name);
    } catch (err) {
      this.open.delete(pack);
      throw err;
    }
    this.slots[slot] = pack;
  }

  /** Takes no more records; its durable write starts now (an object store uploads it in the background). */
  private seal(pack: OpenPack): void {
    const slot = this.slots.indexOf(pack);
    if (slot >= 0) this.slots[slot] = null;
    if (pack.sealed) return;
    pack.sealed = true;
    // Everything in it already published (and so durable): nothing left to do for it.
    if (pack.entries.length === 0) this.open.delete(pack);
    else pack.sink!.flush().catch(() => undefined); // reported by the sync that publishes it
  }

  /** The record will never be published (its put failed, or the blob was deleted first). */
  private forget(pack: OpenPack, entry: Entry): void {
    pack.entries = pack.entries.filter((e) => e !== entry);
    if (this.pending.get(entry.id)?.entry === entry) this.pending.delete(entry.id);
    if (pack.sealed && pack.entries.length === 0) this.open.delete(pack);
  }

  /** Makes what is pending durable and publishes it; concurrent syncs run one after another. */
  sync(): Promise<void> {
    const run = this.lastSync.catch(() => undefined).then(() => this.syncNow());
    this.lastSync = run;
    return run;
  }

  private async syncNow(): Promise<void> {
    // An object is written once: the packs being filled go now, whole.
    if (!this.backend.appendAfterFlush) for (const p of this.slots) if (p) this.seal(p);
    const batch = [...this.open].filter((p) => p.entries.length > 0).map((pack) => ({ pack, entries: [...pack.entries] }));
    if (batch.length === 0) return;
    const settled = await Promise.allSettled(batch.map(async ({ pack, entries }) => {
      const writes = await Promise.allSettled(entries.map((e) => e.written));
      // A record whose write failed was never stored: its put said so.
      entries.forEach((e, i) => writes[i]!.status === 'rejected' && this.forget(pack, e));
      await pack.sink!.flush();
      // What is still to publish (a blob deleted meanwhile is not).
      const still = new Set(pack.entries);
      return entries.filter((e) => still.has(e));
    }));
    const durable = batch.flatMap(({ pack }, i) => {
      const s = settled[i]!;
      return s.status === 'fulfilled' ? s.value.map((entry) => ({ pack, entry, to: { pack: pack.name, offset: entry.offset, length: entry.length } })) : [];
    });
    const fresh = durable.filter((d) => !d.entry.from).map((d) => ({ id: d.entry.id, ...d.to }));
    const moved = durable.filter((d) => d.entry.from).map((d) => ({ id: d.entry.id, from: d.entry.from!, to: d.to }));
    if (fresh.length) await this.index.insert(fresh, Date.now());
    if (moved.length) await this.index.relocate(moved);
    for (const d of durable) this.forget(d.pack, d.entry);
    const failed = settled.filter((s): s is PromiseRejectedResult => s.status === 'rejected');
    if (failed.length) {
      throw new CarryonError('store-unavailable', `writing ${failed.length} pack(s) to ${this.backend.label} failed (kept for the next sync): ${(failed[0]!.reason as Error).message}`);
    }
  }

  async delete(id: ChunkId): Promise<void> {
    parseChunkId(id);
    // Not published yet: its record stays in the pack as dead bytes, never indexed.
    const p = this.pending.get(id);
    if (p) this.forget(p.pack, p.entry);
    // Published: the bytes stay in the pack until compaction; the index no longer names them.
    await this.index.delete(id);
  }

  async *list(): AsyncIterable<ChunkId> {
    for await (const row of this.index.list()) yield row.id;
    for (const id of this.pending.keys()) yield id;
  }

  async missing(ids: readonly ChunkId[]): Promise<ChunkId[]> {
    const unique = [...new Set(ids)];
    for (const id of unique) parseChunkId(id);
    const present = await this.index.present(unique.filter((id) => !this.pending.has(id)));
    await this.touch([...present]);
    return unique.filter((id) => !this.pending.has(id) && !present.has(id));
  }

  private async touch(ids: readonly ChunkId[]): Promise<void> {
    if (ids.length === 0) return;
    const now = Date.now();
    await this.index.touch(ids, now, now - this.touchSlackMs);
  }

  putManifest(digest: string, encoded: Uint8Array): Promise<void> {
    return this.manifestStore.put(digest, encoded);
  }

  getManifest(digest: string): Promise<Buffer | null> {
    return this.manifestStore.get(digest);
  }

  manifests(): AsyncIterable<{ digest: string; modifiedAt: number }> {
    return this.manifestStore.list();
  }

  deleteManifest(digest: string): Promise<void> {
    return this.manifestStore.delete(digest);
  }

  async stats(): Promise<{ chunks: number; bytes: number }> {
    let { chunks, bytes } = await this.index.stats();
    for (const { entry } of this.pending.values()) {
      chunks++;
      bytes += entry.length;
    }
    return { chunks, bytes };
  }

  /** Packs and the bytes in them that no index row names (crash leftovers, deleted blobs). */
  async packUsage(): Promise<{ packs: number; packBytes: number; liveBytes: number }> {
    const packs = await this.packs();
    return { packs: packs.length, packBytes: packs.reduce((s, p) => s + p.bytes, 0), liveBytes: packs.reduce((s, p) => s + p.liveBytes, 0) };
  }

  // Garbage collection (see src/broker/gc/)

  usage(): AsyncIterable<BlobUse> {
    return this.index.list();
  }

  sweep(ids: readonly ChunkId[], cutoff: number): Promise<{ blobs: number; bytes: number }> {
    return this.index.sweep(ids, cutoff);
  }

  async sealPacks(): Promise<void> {
    await Promise.all(this.opening.filter(Boolean));
    for (const p of this.slots) if (p) this.seal(p);
  }

  async packs(): Promise<PackInfo[]> {
    const live = new Map((await this.index.packs()).map((p) => [p.name, p.liveBytes]));
    const own = new Set([...this.open].map((p) => p.name));
    const out: PackInfo[] = [];
    for await (const o of this.backend.list('packs')) {
      const createdAt = packCreatedAt(o.name);
      // Another process may still append to (or upload and index) a pack younger than twice the
      // maximum age; one named with our pid was written by us (or a dead process): only we write it.
      const mine = packWriterPid(o.name) === process.pid;
      const active = own.has(o.name) || createdAt === null || (!mine && Date.now() - createdAt < 2 * this.packMaxAgeMs);
      out.push({ name: o.name, createdAt, bytes: o.bytes, liveBytes: live.get(o.name) ?? 0, active });
    }
    return out;
  }

  /** Whether this process still writes or publishes `name`. */
  private busy(name: string): boolean {
    return [...this.open].some((p) => p.name === name);
  }

  async compactPack(info: PackInfo): Promise<{ moved: number; freedBytes: number }> {
    if (info.active || this.busy(info.name)) return { moved: 0, freedBytes: 0 };
    const rows = await this.index.inPack(info.name);
    for (let i = 0; i < rows.length; i += COMPACT_BATCH) {
      const batch = rows.slice(i, i + COMPACT_BATCH);
      const blobs = await this.readRecords(batch.map((row) => ({ id: row.id, loc: row })));
      const writes: Promise<void>[] = [];
      for (const [k, row] of batch.entries()) {
        if (!blobs[k]) throw new CarryonError('store-corrupt', `pack ${info.name}, which the index names, is missing`);
        writes.push((await this.append(encodeRecord(row.id, blobs[k]!), { id: row.id, length: row.length, from: row })).entry.written);
      }
      await Promise.all(writes);
    }
    if (rows.length) await this.sync();
    return { moved: rows.length, freedBytes: await this.dropPack(info) };
  }

  async dropPack(info: PackInfo): Promise<number> {
    if (info.active || this.busy(info.name) || (await this.index.inPack(info.name)).length > 0) return 0;
    await this.backend.delete('packs', info.name);
    return info.bytes;
  }

  /** Publishes what is pending, then releases the backend and the index even when that fails. */
  async close(): Promise<void> {
    try {
      await this.sync();
    } finally {
      this.slots.fill(null);
      await this.backend.close();
      await this.index.close();
    }
  }
}
