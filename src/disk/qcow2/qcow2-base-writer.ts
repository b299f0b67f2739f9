import { endianness } from 'node:os';
import { open, type FileHandle } from 'node:fs/promises';
import { DiskError } from '../block-device.js';
import type { Piece } from '../../core/chunks/delta.js';
import { COMPRESSED, COPIED, EXTENDED_L2, layerVolumeKey, OFFSET_MASK, readQcow2Header, readWords, UnsupportedImage } from './qcow2-format.js';
import { ALL_ALLOCATED, allocatedOf, bitmapOf, coverSubclusters, SUBCLUSTERS, touchedSubclusters, zerosAndPieces } from './subclusters.js';
import { XtsSectors } from './xts.js';
import { XtsWriters } from './xts-writers.js';

/**
 * Fills the base layer of a chain (a LUKS-encrypted qcow2 with one chunk per cluster) from Node,
 * without QEMU: used by a check-out while no VM holds the chain.
 *
 * Why: on a 2-core laptop qemu-storage-daemon spent 8 CPU s on the 2 GiB of data of the 4 GiB
 * bench desktop (its AES-XTS per 512-byte sector, plus NBD and qcow2 work), half of the whole
 * check-out. Here a chunk is encrypted in two OpenSSL ECB calls (xts.ts) and written with one
 * pwrite, on writer threads (xts-writers.ts); the qcow2 metadata is ours to write because the
 * image is new and ours alone.
 *
 * What the image must be (else `open` refuses with 'unsupported' and the caller goes through
 * QEMU): qcow2 v3, LUKS, no backing file, no snapshots, no incompatible feature but extended L2
 * (not dirty, corrupt, external data file, compression type), 16-bit refcounts, cluster = chunk.
 * With extended L2 (session 13's bases; bases are made without since: layer-template.ts) a chunk
 * made of pages over a hole is written in the subclusters the pages touch, the others marked as
 * reading zeros (subclusters.ts).
 *
 * Crash safety, QEMU's own ordering (qcow2 "refcounts before L2"): a chunk's data and the
 * refcounts of every cluster allocated are made durable first, then the L2 tables and L1 that
 * map them. A kill leaves at worst clusters counted but unmapped (leaks: `qemu-img check`
 * accepts the image and `-r leaks` frees them) and never a mapping to unwritten data. Chunks
 * already mapped (an earlier run, or QEMU's block-stream while a VM ran) are rewritten in place.
 */
export class Qcow2BaseWriter {
  private readonly l2Entries: number;
  /** Bytes per L2 entry: 16 with extended L2 (host offset, then the subclusters' bitmap), else 8. */
  private readonly entryBytes: number;
  private readonly subcluster: number;
  private readonly refsPerBlock: number;
  /** Next cluster to allocate: the file only grows (clusters freed by QEMU inside it stay free). */
  private end: number;
  private readonly l2 = new Map<number, { offset: number; table: Buffer; fresh: boolean }>();
  /** Every refcount block, read at open (to find where allocation starts) or made here. */
  private readonly refBlocks = new Map<number, { offset: number; block: Buffer }>();
  private readonly dirtyRefBlocks = new Set<number>();
  private refTableDirty = false;
  /** Chunks written whose mapping is not on disk yet, by index → host offset and (extended L2) subcluster bitmap. */
  private readonly ready = new Map<number, { host: number; bitmap: bigint }>();
  /**
   * The bitmap each chunk written here will have (extended L2): a later piece over it knows which
   * subclusters hold data. Not derivable from `ready` and the tables: `persist` takes the ready
   * ones before it writes them into the tables, and a piece in between must not pad over them.
   */
  private readonly bitmaps = new Map<number, bigint>();
  /** Host cluster of each chunk this writer placed (or found), so a rewrite lands in the same place. */
  private readonly placed = new Map<number, number>();

  private constructor(
    private readonly fh: FileHandle,
    private readonly path: string,
    private readonly writers: XtsWriters,
    readonly clusterSize: number,
    readonly diskSize: number,
    private readonly l1: BigUint64Array,
    private readonly l1Offset: number,
    private readonly refTable: BigUint64Array,
    private readonly refTableOffset: number,
    usedEnd: number,
    private readonly extended: boolean,
  ) {
    this.entryBytes = extended ? 16 : 8;
    this.l2Entries = clusterSize / this.entryBytes;
    this.subcluster = extended ? clusterSize / SUBCLUSTERS : clusterSize;
    this.refsPerBlock = clusterSize / 2;
    this.end = Math.ceil(usedEnd / clusterSize) * clusterSize;
  }

  /**
   * Opens the base at `path` with its LUKS passphrase; `chunkSize` must be its cluster size.
   * `directIo: false` keeps the clusters' writes in the page cache (tests of that path).
   */
  static async open(path: string, passphrase: string, chunkSize: number, opts: { directIo?: boolean } = {}): Promise<Qcow2BaseWriter> {
    const unsupported = (why: string): never => {
      throw new UnsupportedImage(`${path}: ${why}`);
    };
    if (endianness() !== 'LE') unsupported('big-endian host');
    if (!XtsSectors.available()) unsupported('this runtime lacks WebAssembly SIMD');
    const fh = await open(path, 'r+');
    try {
      const h = await readQcow2Header(fh, path);
      const { clusterSize, diskSize, l1Size, l1Offset, refTableOffset } = h;
      if (h.hasBacking) unsupported('it has a backing file');
      if (clusterSize !== chunkSize) unsupported(`cluster size ${clusterSize} is not the chunk size ${chunkSize}`);
      if (h.snapshots !== 0) unsupported('it has internal snapshots');
      if ((h.incompatible & ~EXTENDED_L2) !== 0n) unsupported(`incompatible features 0x${h.incompatible.toString(16)}`);
      const extended = (h.incompatible & EXTENDED_L2) !== 0n;
      if (h.refcountOrder !== 4) unsupported(`${2 ** h.refcountOrder}-bit refcounts`);
      if (l1Size * (clusterSize / (extended ? 16 : 8)) * clusterSize < diskSize) unsupported('its L1 table does not cover the disk');
      const key = await layerVolumeKey(fh, path, passphrase);
      const l1 = await readWords(fh, l1Offset, l1Size);
      const refTable = await readWords(fh, refTableOffset, (h.refTableClusters * clusterSize) / 8);
      const { size } = await fh.stat();
      // Allocation starts past the file's end and past every cluster with a refcount: a run that
      // failed (a full disk) may have counted clusters it never wrote (leaks, not data).
      let end = size;
      const blocks = new Map<number, { offset: number; block: Buffer }>();
      for (let rt = 0; rt < refTable.length; rt++) {
        const at = Number(refTable[rt]! & OFFSET_MASK);
        if (at === 0) continue;
        const block = Buffer.alloc(clusterSize);
        const { bytesRead: got } = await fh.read(block, 0, block.length, at);
        if (got !== block.length) unsupported(`refcount block ${rt} lies past the end of the file`);
        blocks.set(rt, { offset: at, block });
        for (let i = clusterSize / 2 - 1; i >= 0; i--) {
          if (block.readUInt16BE(i * 2) === 0) continue;
          end = Math.max(end, (rt * (clusterSize / 2) + i + 1) * clusterSize);
          break;
        }
      }
      const w = new Qcow2BaseWriter(fh, path, new XtsWriters(key, fh.fd, opts.directIo === false ? null : path, clusterSize, extended ? clusterSize / SUBCLUSTERS : null), clusterSize, diskSize, l1, l1Offset, refTable, refTableOffset, end, extended);
      for (const [rt, b] of blocks) w.refBlocks.set(rt, b);
      key.fill(0);
      return w;
    } catch (err) {
      await fh.close();
      throw err;
    }
  }

  /**
   * Encrypts and writes chunk `index` (its buffer is the writer threads' now: the caller must not
   * use `plain` afterwards); it is mapped (durable) by the next `persist`.
   */
  async write(index: number, plain: Buffer): Promise<void> {
    this.checkChunk(index, plain.length);
    const host = this.placed.get(index) ?? (await this.place(index));
    // A short last chunk fills its cluster with zeros (the writers pad it; what QEMU reads past the disk's end is never used).
    // With subclusters, those holding only zeros are left unwritten and read as zeros.
    const written = await this.writers.write(plain, host);
    this.mark(index, host, written === null ? ALL_ALLOCATED : bitmapOf(written));
  }

  /**
   * Writes chunk `index` as zeros with `pieces` over them (a delta record's pages over a hole),
   * whatever the base held there. With extended L2 only the subclusters the pieces touch are
   * written (zeros around the pieces within them), the others marked as reading zeros; without,
   * the whole chunk is written.
   */
  async writeOverZeros(index: number, length: number, pieces: readonly Piece[]): Promise<void> {
    this.checkChunk(index, length);
    if (!this.extended) {
      const slot = this.writers.spare();
      const whole = zerosAndPieces(slot, length, pieces);
      try {
        return await this.write(index, whole);
      } catch (err) {
        if (slot) this.writers.giveBack(slot);
        throw err;
      }
    }
    const touched = touchedSubclusters(pieces, this.subcluster);
    const host = this.placed.get(index) ?? (await this.place(index));
    if (touched) await this.writers.writePieces(coverSubclusters(pieces, touched, this.subcluster), host);
    this.mark(index, host, bitmapOf(touched));
  }

  /**
   * Writes pieces of chunk `index` over the bytes it holds (a delta's pages: the rest of the chunk
   * is the base's, already there). Only for a chunk mapped in this image: an unmapped one would
   * leave the rest of a fresh cluster unwritten, so that is refused.
   */
  async writePieces(index: number, pieces: readonly Piece[]): Promise<void> {
    this.checkIndex(index);
    let host = this.placed.get(index);
    let bitmap = this.bitmaps.get(index);
    if (host === undefined || bitmap === undefined) {
      const entry = await this.entry(index);
      if ((entry.word & OFFSET_MASK) === 0n) throw new DiskError('state', `${this.path}: chunk ${index} is not here to write pages over`);
      host = await this.place(index);
      bitmap = entry.bitmap;
    }
    let write = pieces;
    const allocated = allocatedOf(bitmap);
    if (this.extended && allocated !== 0xffff_ffff) {
      // Some subclusters read as zeros (pages written over a hole, or QEMU's own writes): a piece
      // into one writes it whole, zeros around the piece, since its old bytes are not on disk.
      const touched = touchedSubclusters(pieces, this.subcluster);
      const fresh = (touched & ~allocated) >>> 0;
      if (fresh) write = coverSubclusters(pieces, fresh, this.subcluster);
      bitmap = bitmapOf(allocated | touched);
    }
    await this.writers.writePieces(write, host);
    this.mark(index, host, bitmap);
  }

  /** A cluster-sized buffer to open the next chunk's plaintext into (then `write` it, or `giveBack`); null if none is free. */
  spare(): Buffer | null {
    return this.writers.spare();
  }

  /** A `spare` buffer that will not be written (its chunk failed authentication). */
  giveBack(buf: Buffer): void {
    this.writers.giveBack(buf);
  }

  /**
   * Makes every chunk written so far durable and mapped: refcounts, sync, L2 tables and L1, sync.
   * Not concurrent with itself (the caller serialises); writes may go on meanwhile.
   */
  async persist(): Promise<number[]> {
    // One synchronous snapshot: the chunks to map, the refcount blocks to write, and the refcount table
    // as it points to those blocks (one made while this runs waits for the next persist, table entry included).
    const mapped = [...this.ready];
    this.ready.clear();
    const blocks = [...this.dirtyRefBlocks];
    const table = this.refTableDirty ? wordsToBuffer(this.refTable) : null;
    this.refTableDirty = false;
    for (const rt of blocks) {
      const b = this.refBlocks.get(rt)!;
      // Clean before the write: a count set while it runs (writes go on) marks the block again for the next persist.
      this.dirtyRefBlocks.delete(rt);
      await this.writeAll(b.block, b.offset);
    }
    if (table) {
      // A new refcount block is durable before the table points to it (else: a block of zeros).
      await this.fh.datasync();
      await this.writeAll(table, this.refTableOffset);
    }
    await this.fh.datasync();
    if (mapped.length === 0) return [];
    const tables = new Set<number>();
    for (const [index, { host, bitmap }] of mapped) {
      const i1 = Math.floor(index / this.l2Entries);
      const t = this.l2.get(i1)!;
      const at = (index % this.l2Entries) * this.entryBytes;
      t.table.writeBigUInt64BE(BigInt(host) | COPIED, at);
      if (this.extended) t.table.writeBigUInt64BE(bitmap, at + 8);
      tables.add(i1);
    }
    let l1Dirty = false;
    for (const i1 of tables) {
      const t = this.l2.get(i1)!;
      await this.writeAll(t.table, t.offset);
      if (t.fresh) {
        this.l1[i1] = BigInt(t.offset) | COPIED;
        t.fresh = false;
        l1Dirty = true;
      }
    }
    if (l1Dirty) await this.writeAll(wordsToBuffer(this.l1), this.l1Offset);
    await this.fh.datasync();
    return mapped.map(([index]) => index);
  }

  /** Call once no write is in flight (a write still running is failed). */
  async close(): Promise<void> {
    await this.writers.close();
    await this.fh.close();
  }

  private checkIndex(index: number): void {
    if (!Number.isInteger(index) || index < 0 || index * this.clusterSize >= this.diskSize) throw new DiskError('range', `chunk ${index} lies outside the ${this.diskSize}-byte disk`);
  }

  /** A whole chunk's `length`: the cluster, or what is left of the disk for the last one. */
  private checkChunk(index: number, length: number): void {
    this.checkIndex(index);
    if (length !== Math.min(this.clusterSize, this.diskSize - index * this.clusterSize)) throw new DiskError('range', `chunk ${index} has ${length} bytes`);
  }

  /** What the next persist maps for chunk `index`. */
  private mark(index: number, host: number, bitmap: bigint): void {
    this.ready.set(index, { host, bitmap });
    this.bitmaps.set(index, bitmap);
  }

  /** Chunk `index`'s L2 entry as on disk (or read earlier): its first word and its subclusters' bitmap (all allocated without extended L2). */
  private async entry(index: number): Promise<{ word: bigint; bitmap: bigint }> {
    const i1 = Math.floor(index / this.l2Entries);
    if (i1 >= this.l1.length) throw new DiskError('range', `chunk ${index} is past the L1 table`);
    const { table } = await this.l2Table(i1);
    const at = (index % this.l2Entries) * this.entryBytes;
    return { word: table.readBigUInt64BE(at), bitmap: this.extended ? table.readBigUInt64BE(at + 8) : ALL_ALLOCATED };
  }

  /** The host cluster for chunk `index`: where it is mapped already, else a new one at the end. */
  private async place(index: number): Promise<number> {
    const entry = (await this.entry(index)).word;
    const offset = Number(entry & OFFSET_MASK);
    let host: number;
    if (offset !== 0) {
      if (entry & COMPRESSED) throw new DiskError('state', `${this.path}: chunk ${index} is stored compressed`);
      if (!(entry & COPIED)) throw new DiskError('state', `${this.path}: chunk ${index} is shared (refcount > 1)`);
      host = offset;
    } else {
      host = await this.allocate();
    }
    this.placed.set(index, host);
    return host;
  }

  /** L2 table `i1`: read once, or a fresh zeroed cluster (mapped by L1 only at `persist`). */
  private async l2Table(i1: number) {
    const known = this.l2.get(i1);
    if (known) return known;
    const at = Number(this.l1[i1]! & OFFSET_MASK);
    let t;
    if (at !== 0) {
      if (!(this.l1[i1]! & COPIED)) throw new DiskError('state', `${this.path}: L2 table ${i1} is shared (refcount > 1)`);
      const table = Buffer.alloc(this.clusterSize);
      await this.readAll(table, at);
      t = { offset: at, table, fresh: false };
    } else {
      t = { offset: 0, table: Buffer.alloc(this.clusterSize), fresh: true };
      this.l2.set(i1, t); // before allocating: a concurrent caller must find this one
      t.offset = await this.allocate();
      return t;
    }
    // Two callers may have read it at once: the first one kept wins.
    const again = this.l2.get(i1);
    if (again) return again;
    this.l2.set(i1, t);
    return t;
  }

  /** A new cluster at the end of the file, its refcount set to 1 (durable at the next `persist`). */
  private async allocate(): Promise<number> {
    const host = this.end;
    this.end += this.clusterSize;
    await this.setRefcount(host / this.clusterSize);
    return host;
  }

  private async setRefcount(cluster: number): Promise<void> {
    const rt = Math.floor(cluster / this.refsPerBlock);
    if (rt >= this.refTable.length) throw new DiskError('state', `${this.path}: refcount table too small for cluster ${cluster}`);
    let b = this.refBlocks.get(rt);
    if (!b) {
      // A new refcount block takes the next cluster and counts itself when it lies in its own range.
      const self = this.end / this.clusterSize;
      this.end += this.clusterSize;
      b = { offset: self * this.clusterSize, block: Buffer.alloc(this.clusterSize) };
      this.refTable[rt] = BigInt(b.offset);
      this.refTableDirty = true;
      this.refBlocks.set(rt, b);
      this.dirtyRefBlocks.add(rt);
      if (Math.floor(self / this.refsPerBlock) === rt) b.block.writeUInt16BE(1, (self % this.refsPerBlock) * 2);
      else await this.setRefcount(self);
    }
    const at = (cluster % this.refsPerBlock) * 2;
    if (b.block.readUInt16BE(at) !== 0) throw new DiskError('state', `${this.path}: cluster ${cluster} past the end of the file is already in use`);
    b.block.writeUInt16BE(1, at);
    this.dirtyRefBlocks.add(rt);
  }

  /** A short write (a disk filling up) is continued: the next write then fails with the OS's own error (ENOSPC). */
  private async writeAll(buf: Buffer, at: number): Promise<void> {
    for (let done = 0; done < buf.length;) {
      const { bytesWritten } = await this.fh.write(buf, done, buf.length - done, at + done);
      if (bytesWritten === 0) throw new DiskError('io', `${this.path}: nothing written at ${at + done}`);
      done += bytesWritten;
    }
  }

  private async readAll(buf: Buffer, at: number): Promise<void> {
    const { bytesRead } = await this.fh.read(buf, 0, buf.length, at);
    if (bytesRead !== buf.length) throw new DiskError('state', `${this.path}: metadata at ${at} lies past the end of the file`);
  }
}

function wordsToBuffer(words: BigUint64Array): Buffer {
  const buf = Buffer.alloc(words.length * 8);
  for (let i = 0; i < words.length; i++) buf.writeBigUInt64BE(words[i]!, i * 8);
  return buf;
}
