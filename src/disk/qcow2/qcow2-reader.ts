import { open, type FileHandle } from 'node:fs/promises';
import { DiskError } from '../block-device.js';
import { COMPRESSED, EXTENDED_L2, layerVolumeKey, OFFSET_MASK, readQcow2Header, readWords, UnsupportedImage } from './qcow2-format.js';
import { XTS_SECTOR, XtsSectors } from './xts.js';

/**
 * Reads a layer's guest bytes from Node, decrypted, as QEMU would serve them, without starting
 * QEMU and without an image lock (QEMU's locks bind QEMU processes only):
 * - a base (`open`): to check it against its checkpoint's chunk IDs while a VM or storage daemon
 *   holds the chain, and to copy a parked or sibling base's chunks; unallocated clusters read as zeros;
 * - a stopped top (`openTop`): a check-in reads only what the top holds itself (its present ranges,
 *   qcow2-map.ts), in its subclusters (extended L2); a byte the top leaves to its backing is refused.
 *   Before this a check-in started qemu-storage-daemon for it: a process start on the cores the
 *   check-in needs, and QEMU's AES-XTS per 512-byte sector on every byte (≈ 4 CPU s per GiB here).
 * What QEMU reads for a guest offset is what this reads: the mapping (header, L1, L2) is pinned by
 * the layer's recorded shape (layer-shape.ts), checked before a chain opens.
 *
 * The LUKS data of a qcow2 layer is encrypted by host offset (sector = host offset / 512).
 */
/** 64 MiB of L1 entries: far above any disk here (a 4 GiB top's L1 has 4). */
const MAX_L1_ENTRIES = 8 * 1024 * 1024;

export class Qcow2Reader {
  private readonly l2 = new Map<number, Buffer>();
  /** Read buffers free for the next read (as many as reads ever ran at once). */
  private readonly buffers: Buffer[] = [];
  private readonly entryBytes: number;
  /** The unit of allocation: a subcluster with extended L2, else the cluster. */
  private readonly granule: number;
  private closed = false;

  private constructor(
    private readonly fh: FileHandle,
    private readonly path: string,
    private readonly xts: XtsSectors,
    private readonly clusterSize: number,
    readonly diskSize: number,
    private readonly l1: BigUint64Array,
    private readonly extended: boolean,
    /** Bytes this layer does not hold belong to a backing file: reading them is refused, not zeros. */
    private readonly hasBacking: boolean,
  ) {
    this.entryBytes = extended ? 16 : 8;
    this.granule = extended ? clusterSize / 32 : clusterSize;
  }

  /** A base layer: no backing file, no incompatible feature but extended L2. */
  static async open(path: string, passphrase: string): Promise<Qcow2Reader> {
    return Qcow2Reader.openLayer(path, passphrase, false);
  }

  /**
   * A top layer (backing file and extended L2 allowed), read only where it holds bytes itself.
   * An image this parser does not fully know (another incompatible feature) is `UnsupportedImage`:
   * the caller reads it through QEMU instead.
   */
  static async openTop(path: string, passphrase: string): Promise<Qcow2Reader> {
    return Qcow2Reader.openLayer(path, passphrase, true);
  }

  private static async openLayer(path: string, passphrase: string, top: boolean): Promise<Qcow2Reader> {
    const fh = await open(path, 'r');
    try {
      const h = await readQcow2Header(fh, path);
      if (!top && h.hasBacking) throw new DiskError('state', `${path}: a base layer has no backing file`);
      if ((h.incompatible & ~EXTENDED_L2) !== 0n) {
        const why = `${path}: incompatible features 0x${h.incompatible.toString(16)}`;
        throw top ? new UnsupportedImage(why) : new DiskError('state', why);
      }
      // Opened before the layer's shape is checked (a check-in opens its tops' key slots early): an edited header asks for no huge table.
      if (h.l1Size > MAX_L1_ENTRIES) throw new DiskError('state', `${path}: an L1 table of ${h.l1Size} entries`);
      const key = await layerVolumeKey(fh, path, passphrase);
      const xts = new XtsSectors(key);
      key.fill(0);
      const extended = (h.incompatible & EXTENDED_L2) !== 0n;
      return new Qcow2Reader(fh, path, xts, h.clusterSize, h.diskSize, await readWords(fh, h.l1Offset, h.l1Size), extended, h.hasBacking);
    } catch (err) {
      await fh.close();
      throw err;
    }
  }

  /**
   * Guest bytes [offset, offset + length). `into` (at least `length` bytes; a writer's slot): the
   * result is a view of it instead of a new buffer.
   */
  async read(offset: number, length: number, into?: Buffer): Promise<Buffer> {
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0 || offset + length > this.diskSize) {
      throw new DiskError('range', `${offset}+${length} lies outside the ${this.diskSize}-byte disk`);
    }
    // Every byte is written below: decrypted, or zeros where the layer says so.
    const out = into && into.length >= length ? into.subarray(0, length) : Buffer.allocUnsafe(length);
    for (let done = 0; done < length;) {
      const guest = offset + done;
      const inCluster = guest % this.clusterSize;
      const run = await this.locate(Math.floor(guest / this.clusterSize), inCluster, Math.min(this.clusterSize - inCluster, length - done));
      if (run.host !== null) {
        // Whole sectors around the range, decrypted, then the asked part copied out.
        const from = Math.floor(inCluster / XTS_SECTOR) * XTS_SECTOR;
        const to = Math.ceil((inCluster + run.length) / XTS_SECTOR) * XTS_SECTOR;
        // Cluster-sized buffers kept between reads: a fresh 256 KiB one per read is an mmap, its page faults and a munmap.
        const whole = this.buffers.pop() ?? Buffer.allocUnsafeSlow(this.clusterSize);
        try {
          const cipher = whole.subarray(0, to - from);
          const { bytesRead } = await this.fh.read(cipher, 0, cipher.length, run.host + from);
          if (bytesRead !== cipher.length) throw new DiskError('state', `${this.path}: cluster at ${run.host} lies past the end of the file`);
          this.xts.decryptView(cipher, (run.host + from) / XTS_SECTOR).copy(out, done, inCluster - from, inCluster - from + run.length);
        } finally {
          this.buffers.push(whole);
        }
      } else {
        out.fill(0, done, done + run.length);
      }
      done += run.length;
    }
    return out;
  }

  /** Closes the file; again, nothing. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await this.fh.close();
  }

  /**
   * From `inCluster` of guest cluster `index`, at most `want` bytes that read alike: from the host
   * cluster (`host`: its offset; the bytes lie at the same offset within it) or as zeros (null).
   */
  private async locate(index: number, inCluster: number, want: number): Promise<{ host: number | null; length: number }> {
    const table = await this.l2Table(index);
    const at = (index % (this.clusterSize / this.entryBytes)) * this.entryBytes;
    const entry = table ? table.readBigUInt64BE(at) : 0n;
    if (entry & COMPRESSED) throw new UnsupportedImage(`${this.path}: cluster ${index} is compressed`);
    const host = Number(entry & OFFSET_MASK);
    if (!this.extended) {
      if (entry & 1n) return { host: null, length: want }; // "reads as zeros" (qcow2 v3)
      if (host === 0) return { host: null, length: this.absent(index * this.clusterSize + inCluster, want) };
      return { host, length: want };
    }
    // Extended L2: per subcluster an "allocated" bit (0–31) and a "reads as zeros" bit (32–63).
    const bitmap = table ? table.readBigUInt64BE(at + 8) : 0n;
    const state = (k: number) => ((bitmap >> BigInt(k)) & 1n ? 'data' : (bitmap >> BigInt(32 + k)) & 1n ? 'zero' : 'absent');
    const first = Math.floor(inCluster / this.granule);
    const kind = state(first);
    // The run ends where the next subcluster reads otherwise.
    let end = (first + 1) * this.granule;
    while (end < inCluster + want && state(end / this.granule) === kind) end += this.granule;
    const length = Math.min(want, end - inCluster);
    if (kind === 'zero') return { host: null, length };
    if (kind === 'absent') return { host: null, length: this.absent(index * this.clusterSize + inCluster, length) };
    if (host === 0) throw new DiskError('state', `${this.path}: cluster ${index} has allocated subclusters but no host cluster`);
    return { host, length };
  }

  /** Bytes the layer does not hold: zeros for a base, another layer's for a top (refused). */
  private absent(guest: number, length: number): number {
    if (this.hasBacking) throw new DiskError('state', `${this.path}: bytes ${guest}–${guest + length - 1} are not held by this layer (its backing file's)`);
    return length;
  }

  /** The L2 table of guest cluster `index`, or null where L1 maps none. */
  private async l2Table(index: number): Promise<Buffer | null> {
    const i1 = Math.floor(index / (this.clusterSize / this.entryBytes));
    const at = Number((this.l1[i1] ?? 0n) & OFFSET_MASK);
    if (at === 0) return null;
    let table = this.l2.get(i1);
    if (!table) {
      table = Buffer.alloc(this.clusterSize);
      const { bytesRead } = await this.fh.read(table, 0, table.length, at);
      if (bytesRead !== table.length) throw new DiskError('state', `${this.path}: L2 table ${i1} lies past the end of the file`);
      this.l2.set(i1, table);
    }
    return table;
  }
}
