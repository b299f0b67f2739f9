import { open, type FileHandle } from 'node:fs/promises';
import { DiskError } from '../block-device.js';
import { COMPRESSED, layerVolumeKey, OFFSET_MASK, readQcow2Header, readWords } from './qcow2-format.js';
import { XTS_SECTOR, XtsSectors } from './xts.js';

/**
 * Reads a base layer's guest bytes from Node, decrypted, as QEMU would serve them: used to check
 * a base against its checkpoint's chunk IDs while a VM or storage daemon holds the chain. Plain
 * reads take no image lock (QEMU's locks bind QEMU processes only), and the base never changes
 * once complete (QEMU opens it read-only). What QEMU reads for a guest offset is what this reads:
 * the mapping (header, L1, L2) is pinned by the layer's recorded shape (layer-shape.ts), checked
 * before the chain opens.
 *
 * The LUKS data of a qcow2 layer is encrypted by host offset (sector = host offset / 512).
 */
export class Qcow2BaseReader {
  private readonly l2 = new Map<number, Buffer>();
  /** Read buffers free for the next read (as many as reads ever ran at once). */
  private readonly buffers: Buffer[] = [];

  private constructor(
    private readonly fh: FileHandle,
    private readonly path: string,
    private readonly xts: XtsSectors,
    private readonly clusterSize: number,
    readonly diskSize: number,
    private readonly l1: BigUint64Array,
  ) {}

  static async open(path: string, passphrase: string): Promise<Qcow2BaseReader> {
    const fh = await open(path, 'r');
    try {
      const h = await readQcow2Header(fh, path);
      if (h.hasBacking) throw new DiskError('state', `${path}: a base layer has no backing file`);
      if (h.incompatible !== 0n) throw new DiskError('state', `${path}: incompatible features 0x${h.incompatible.toString(16)}`);
      const key = await layerVolumeKey(fh, path, passphrase);
      const xts = new XtsSectors(key);
      key.fill(0);
      return new Qcow2BaseReader(fh, path, xts, h.clusterSize, h.diskSize, await readWords(fh, h.l1Offset, h.l1Size));
    } catch (err) {
      await fh.close();
      throw err;
    }
  }

  /**
   * Guest bytes [offset, offset + length); unallocated clusters read as zeros. `into` (at least
   * `length` bytes; a writer's slot): the result is a view of it instead of a new buffer.
   */
  async read(offset: number, length: number, into?: Buffer): Promise<Buffer> {
    if (offset < 0 || length < 0 || offset + length > this.diskSize) throw new DiskError('range', `${offset}+${length} lies outside the ${this.diskSize}-byte disk`);
    // Every byte is written below: decrypted, or zeros where nothing is allocated.
    const out = into && into.length >= length ? into.subarray(0, length) : Buffer.allocUnsafe(length);
    for (let done = 0; done < length;) {
      const guest = offset + done;
      const inCluster = guest % this.clusterSize;
      const n = Math.min(this.clusterSize - inCluster, length - done);
      const host = await this.hostCluster(Math.floor(guest / this.clusterSize));
      if (host !== null) {
        // Whole sectors around the range, decrypted, then the asked part copied out.
        const from = Math.floor(inCluster / XTS_SECTOR) * XTS_SECTOR;
        const to = Math.ceil((inCluster + n) / XTS_SECTOR) * XTS_SECTOR;
        // Cluster-sized buffers kept between reads: a fresh 256 KiB one per read is an mmap, its page faults and a munmap.
        const whole = this.buffers.pop() ?? Buffer.allocUnsafeSlow(this.clusterSize);
        try {
          const cipher = whole.subarray(0, to - from);
          const { bytesRead } = await this.fh.read(cipher, 0, cipher.length, host + from);
          if (bytesRead !== cipher.length) throw new DiskError('state', `${this.path}: cluster at ${host} lies past the end of the file`);
          this.xts.decryptView(cipher, (host + from) / XTS_SECTOR).copy(out, done, inCluster - from, inCluster - from + n);
        } finally {
          this.buffers.push(whole);
        }
      } else {
        out.fill(0, done, done + n);
      }
      done += n;
    }
    return out;
  }

  async close(): Promise<void> {
    await this.fh.close();
  }

  /** Host offset of guest cluster `index`, or null where it reads as zeros. */
  private async hostCluster(index: number): Promise<number | null> {
    const perTable = this.clusterSize / 8;
    const i1 = Math.floor(index / perTable);
    const l1 = this.l1[i1] ?? 0n;
    const at = Number(l1 & OFFSET_MASK);
    if (at === 0) return null;
    let table = this.l2.get(i1);
    if (!table) {
      table = Buffer.alloc(this.clusterSize);
      const { bytesRead } = await this.fh.read(table, 0, table.length, at);
      if (bytesRead !== table.length) throw new DiskError('state', `${this.path}: L2 table ${i1} lies past the end of the file`);
      this.l2.set(i1, table);
    }
    const entry = table.readBigUInt64BE((index % perTable) * 8);
    if (entry & COMPRESSED) throw new DiskError('state', `${this.path}: cluster ${index} is compressed (a base never is)`);
    if (entry & 1n) return null; // "reads as zeros" (qcow2 v3)
    const host = Number(entry & OFFSET_MASK);
    return host === 0 ? null : host;
  }
}
