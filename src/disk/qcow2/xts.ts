import { createCipheriv, createDecipheriv, type Cipher, type Decipher } from 'node:crypto';
import { compiledXtsTweaks, instantiateXtsTweaks, type XorTweaks } from './xts-tweaks-wasm.js';

/** LUKS1 and QEMU encrypt in 512-byte sectors, each its own XTS data unit (IV plain64 = sector number). */
export const XTS_SECTOR = 512;

/**
 * AES-256-XTS over runs of consecutive 512-byte sectors, as QEMU's LUKS driver writes them
 * (aes-xts-plain64), at OpenSSL's ECB speed instead of one cipher object per sector.
 *
 * Why: Node's cipher API takes one IV per object, and an object per 512-byte sector runs at
 * ≈ 90 MiB/s. XTS is C = E_K1(P ⊕ T) ⊕ T with T_0 = E_K2(sector) and T_(j+1) = T_j · α in
 * GF(2^128), so a whole run needs two ECB calls (all sectors' T_0 at once, then the data) and
 * the tweak arithmetic, done by a small WebAssembly SIMD routine (xts-tweaks-wasm.ts) in a
 * memory of this object's own. The tests compare every byte with OpenSSL's aes-256-xts.
 */
export class XtsSectors {
  private readonly dataKey: Buffer;
  private readonly tweakKey: Buffer;
  private readonly memory = new WebAssembly.Memory({ initial: 1 });
  private readonly xorTweaks: XorTweaks;
  /** Bytes of data one call may take; the memory holds output, input, then first tweaks. */
  private capacity = 0;
  private view = Buffer.alloc(0);
  /** The sectors' plain64 IVs, kept between calls (only their first 8 bytes are ever written). */
  private ivs = Buffer.alloc(0);
  /** ECB keeps no state between blocks: one cipher object per key and direction serves every call. */
  private readonly ciphers = new Map<string, Cipher | Decipher>();

  /** True where this runtime has WebAssembly SIMD (every Node this project supports). */
  static available(): boolean {
    return compiledXtsTweaks() !== null;
  }

  /** `key`: the 64-byte volume key (data key ‖ tweak key, as LUKS and OpenSSL split it). */
  constructor(key: Buffer) {
    if (key.length !== 64) throw new RangeError(`AES-256-XTS needs a 64-byte key, not ${key.length}`);
    this.dataKey = Buffer.from(key.subarray(0, 32));
    this.tweakKey = Buffer.from(key.subarray(32));
    const xor = instantiateXtsTweaks(this.memory);
    if (!xor) throw new Error('this runtime lacks WebAssembly SIMD, which the XTS writer needs');
    this.xorTweaks = xor;
  }

  /**
   * Encrypts `data` (whole sectors) as the sectors numbered from `firstSector`, into a view of
   * this object's memory, valid until its next call (copy it to keep it). The view starts on a
   * page boundary (a WebAssembly memory is a mapping of its own), so it can be written with O_DIRECT.
   */
  encryptView(data: Buffer, firstSector: number): Buffer {
    return this.run(data, firstSector, false);
  }

  /** Decrypts like `encryptView` encrypts (XTS: P = D_K1(C ⊕ T) ⊕ T, the same tweaks). */
  decryptView(data: Buffer, firstSector: number): Buffer {
    return this.run(data, firstSector, true);
  }

  private run(data: Buffer, firstSector: number, decrypt: boolean): Buffer {
    if (data.length % XTS_SECTOR !== 0) throw new RangeError(`${data.length} bytes is not a whole number of sectors`);
    if (!Number.isSafeInteger(firstSector) || firstSector < 0) throw new RangeError(`bad sector number ${firstSector}`);
    const sectors = data.length / XTS_SECTOR;
    this.reserve(data.length);
    const mem = this.view;
    const out = 0;
    const input = this.capacity;
    const tweaks = 2 * this.capacity;
    // Every sector's first tweak in one ECB call: E_K2(plain64 IV). Bytes 8–15 of each IV stay zero.
    if (this.ivs.length < sectors * 16) this.ivs = Buffer.alloc(sectors * 16);
    const ivs = this.ivs.subarray(0, sectors * 16);
    for (let s = 0; s < sectors; s++) {
      const n = firstSector + s;
      ivs.writeUInt32LE(n % 0x1_0000_0000, s * 16);
      ivs.writeUInt32LE(Math.floor(n / 0x1_0000_0000), s * 16 + 4);
    }
    this.ecb('tweak', ivs, mem, tweaks);
    data.copy(mem, input);
    this.xorTweaks(tweaks, input, out, sectors);
    this.ecb(decrypt ? 'decrypt' : 'encrypt', mem.subarray(out, out + data.length), mem, input);
    this.xorTweaks(tweaks, input, out, sectors);
    return mem.subarray(out, out + data.length);
  }

  /**
   * ECB of `src` into `dst` at `at`, in pieces of at most ECB_PIECE: Node's cipher allocates each
   * call's output, and an allocation of 128 KiB or more is glibc's own mmap, page faults and
   * munmap every time (a 256 KiB chunk's output cost more CPU than its AES).
   */
  private ecb(use: 'tweak' | 'encrypt' | 'decrypt', src: Buffer, dst: Buffer, at: number): void {
    let c = this.ciphers.get(use);
    if (!c) {
      const key = use === 'tweak' ? this.tweakKey : this.dataKey;
      c = use === 'decrypt' ? createDecipheriv('aes-256-ecb', key, null) : createCipheriv('aes-256-ecb', key, null);
      c.setAutoPadding(false);
      this.ciphers.set(use, c);
    }
    for (let o = 0; o < src.length; o += ECB_PIECE) {
      const piece = c.update(src.subarray(o, Math.min(src.length, o + ECB_PIECE)));
      if (piece.length !== Math.min(ECB_PIECE, src.length - o)) throw new Error('AES-ECB returned a short block run');
      piece.copy(dst, at + o);
    }
  }

  private reserve(bytes: number): void {
    if (bytes <= this.capacity) return;
    const capacity = Math.ceil(bytes / WASM_PAGE) * WASM_PAGE;
    const need = Math.ceil((2 * capacity + capacity / 32) / WASM_PAGE);
    const have = this.memory.buffer.byteLength / WASM_PAGE;
    if (need > have) this.memory.grow(need - have);
    this.capacity = capacity;
    this.view = Buffer.from(this.memory.buffer);
  }
}

const WASM_PAGE = 65536;

/** Bytes per ECB call: below glibc's mmap threshold (128 KiB), a whole number of sectors. */
const ECB_PIECE = 64 * 1024;
