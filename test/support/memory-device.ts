import { checkRange, type BlockDevice } from '../../src/disk/block-device.js';

/** An in-memory block device that counts flushes: the NBD server's contract without a disk. */
export class MemoryDevice implements BlockDevice {
  flushes = 0;
  constructor(readonly data: Buffer, readonly readOnly = false) {}
  get size() { return this.data.length; }
  async read(o: number, n: number) { checkRange(this.size, o, n); return Buffer.from(this.data.subarray(o, o + n)); }
  async write(o: number, d: Buffer) { checkRange(this.size, o, d.length); d.copy(this.data, o); }
  async writeZeroes(o: number, n: number) { checkRange(this.size, o, n); this.data.fill(0, o, o + n); }
  async trim(o: number, n: number) { await this.writeZeroes(o, n); }
  async flush() { this.flushes++; }
  async close() {}
}
