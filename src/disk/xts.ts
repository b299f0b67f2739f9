import { createCipheriv } from 'node:crypto';

/** LUKS1 and QEMU encrypt in 512-byte sectors, each its own XTS data unit (IV plain64 = sector number). */
export const XTS_SECTOR = 512;

/**
 * AES-256-XTS over runs of consecutive 512-byte sectors, as QEMU's LUKS driver writes them
 * (aes-xts-plain64), at OpenSSL's ECB speed instead of one cipher object per sector.
 *
 * Why: Node's cipher API takes one IV per object, and an object per 512-byte sector runs at
 * ≈ 90 MiB/s. XTS is C = E_K1(P ⊕ T) ⊕ T with T_0 = E_K2(sector) and T_(j+1) = T_j · α in
 * GF(2^128), so a whole run needs two ECB calls (all sectors' T_0 at once, then the data) and
 * the tweak arithmetic, done here on 32-bit words (≈ 0.7 GB/s on one core of this box, against
 * ≈ 0.47 GB/s for QEMU's XTS). Little-endian hosts only (the word views). The tests compare
 * every byte with OpenSSL's aes-256-xts, sector by sector.
 */
export class XtsSectors {
  private readonly dataKey: Buffer;
  private readonly tweakKey: Buffer;
  private tweaks = new Uint32Array(0);
  private mixed = Buffer.alloc(0);

  /** `key`: the 64-byte volume key (data key ‖ tweak key, as LUKS and OpenSSL split it). */
  constructor(key: Buffer) {
    if (key.length !== 64) throw new RangeError(`AES-256-XTS needs a 64-byte key, not ${key.length}`);
    this.dataKey = Buffer.from(key.subarray(0, 32));
    this.tweakKey = Buffer.from(key.subarray(32));
  }

  /**
   * Encrypts `data` (whole sectors) as the sectors numbered from `firstSector`; returns a new
   * buffer, or `into` (at least as long as `data`, 4-byte aligned) filled with the ciphertext.
   */
  encrypt(data: Buffer, firstSector: number, into?: Buffer): Buffer {
    if (data.length % XTS_SECTOR !== 0) throw new RangeError(`${data.length} bytes is not a whole number of sectors`);
    if (!Number.isSafeInteger(firstSector) || firstSector < 0) throw new RangeError(`bad sector number ${firstSector}`);
    const sectors = data.length / XTS_SECTOR;
    const words = data.length / 4;
    if (this.tweaks.length < words) {
      this.tweaks = new Uint32Array(words);
      this.mixed = Buffer.allocUnsafe(data.length);
    }
    // Every sector's first tweak in one ECB call: E_K2(plain64 IV).
    const ivs = Buffer.alloc(sectors * 16);
    for (let s = 0; s < sectors; s++) {
      const n = firstSector + s;
      ivs.writeUInt32LE(n % 0x1_0000_0000, s * 16);
      ivs.writeUInt32LE(Math.floor(n / 0x1_0000_0000), s * 16 + 4);
    }
    const first = ecb(this.tweakKey, ivs);
    const t0 = new Uint32Array(first.buffer, first.byteOffset, sectors * 4);
    // Word views need 4-byte alignment (a view into a socket or zstd buffer may lack it).
    const aligned = data.byteOffset % 4 === 0 ? data : Buffer.from(data);
    const src = new Uint32Array(aligned.buffer, aligned.byteOffset, words);
    const mixed = this.mixed;
    const x = new Uint32Array(mixed.buffer, mixed.byteOffset, words);
    const t = this.tweaks;
    for (let s = 0; s < sectors; s++) {
      let a = t0[s * 4]!;
      let b = t0[s * 4 + 1]!;
      let c = t0[s * 4 + 2]!;
      let d = t0[s * 4 + 3]!;
      for (let o = s * 128, end = o + 128; o < end; o += 4) {
        t[o] = a;
        t[o + 1] = b;
        t[o + 2] = c;
        t[o + 3] = d;
        x[o] = src[o]! ^ a;
        x[o + 1] = src[o + 1]! ^ b;
        x[o + 2] = src[o + 2]! ^ c;
        x[o + 3] = src[o + 3]! ^ d;
        // T · α: a 128-bit little-endian left shift, reduced by x^128 = x^7 + x^2 + x + 1.
        const carry = d >> 31;
        d = (d << 1) | (c >>> 31);
        c = (c << 1) | (b >>> 31);
        b = (b << 1) | (a >>> 31);
        a = (a << 1) ^ (carry & 0x87);
      }
    }
    const encrypted = ecb(this.dataKey, mixed.subarray(0, data.length));
    const y = new Uint32Array(encrypted.buffer, encrypted.byteOffset, words);
    const out = into ? into.subarray(0, data.length) : encrypted;
    if (out.length < data.length || out.byteOffset % 4 !== 0) throw new RangeError(`the output buffer must hold ${data.length} bytes and be 4-byte aligned`);
    const z = new Uint32Array(out.buffer, out.byteOffset, words);
    for (let i = 0; i < words; i++) z[i] = y[i]! ^ t[i]!;
    return out;
  }
}

function ecb(key: Buffer, data: Buffer): Buffer {
  const c = createCipheriv('aes-256-ecb', key, null);
  c.setAutoPadding(false);
  const out = c.update(data);
  c.final();
  // Word views below need 4-byte alignment; OpenSSL's output buffer is a fresh allocation.
  return out.byteOffset % 4 === 0 ? out : Buffer.from(out);
}
