/**
 * SHA-256 (FIPS 180-4) of a message of at most 55 bytes: one padded block, no allocation.
 *
 * Why not Node's crypto: LUKS1's anti-forensic diffuse hashes 8000 pieces of 36 bytes per key slot
 * (4000 stripes × 2 digest-sized pieces of a 64-byte key), and every slot opened or written here
 * pays that. Through `crypto.hash` each call costs ≈ 1.7 µs of crossing into C++ (≈ 14 ms a slot:
 * most of opening a layer's key, and of a parked copy's key-slot rewrites); this loop takes ≈ 0.4 µs.
 * test/disk/sha256-short.test.ts compares it with Node's SHA-256 for every length it accepts.
 */

/** The round constants and initial hash value (FIPS 180-4), as signed 32-bit words. */
export const SHA256_K = new Int32Array([
  0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
  0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
  0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
  0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
  0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
  0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
  0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
  0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
]);
export const SHA256_H0 = new Int32Array([0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19]);
const W = new Int32Array(64);

/** Longest message that fits one block with its padding (0x80 and the 64-bit length). */
export const SHA256_SHORT_MAX = 55;

/** Writes SHA-256 of `msg[0, len)` to `out[outAt, outAt + 32)`. */
export function sha256Short(msg: Uint8Array, len: number, out: Uint8Array, outAt = 0): void {
  if (!Number.isInteger(len) || len < 0 || len > SHA256_SHORT_MAX || len > msg.length) throw new RangeError(`sha256Short takes 0–${SHA256_SHORT_MAX} bytes, got ${len}`);
  if (outAt < 0 || outAt + 32 > out.length) throw new RangeError('sha256Short: no room for the digest');
  W.fill(0, 0, 16);
  for (let i = 0; i < len; i++) W[i >> 2]! |= msg[i]! << (24 - 8 * (i & 3));
  W[len >> 2]! |= 0x80 << (24 - 8 * (len & 3));
  W[15] = len * 8;
  compressInto(out, outAt);
}

/**
 * LUKS1's diffuse step with SHA-256 (cryptsetup's `diffuse`): each 32-byte piece `i` of `block`
 * becomes SHA-256(i as 4 big-endian bytes ‖ piece), written to `out` (same length; a shorter
 * last piece takes the digest's first bytes). The message words are built straight from the bytes.
 */
export function diffuseSha256(block: Uint8Array, out: Uint8Array): void {
  if (out.length !== block.length) throw new RangeError('diffuseSha256: out must match the block');
  for (let i = 0, at = 0; at < block.length; i++, at += 32) {
    const len = Math.min(32, block.length - at);
    W.fill(0, 0, 16);
    W[0] = i;
    for (let k = 0; k < len; k++) W[1 + (k >> 2)]! |= block[at + k]! << (24 - 8 * (k & 3));
    W[1 + (len >> 2)]! |= 0x80 << (24 - 8 * (len & 3));
    W[15] = (4 + len) * 8;
    if (len === 32) compressInto(out, at);
    else {
      compressInto(lastPiece, 0);
      out.set(lastPiece.subarray(0, len), at);
    }
  }
}
const lastPiece = new Uint8Array(32);

/** The message schedule and compression of the block in W[0, 16), digest to `out[outAt, outAt + 32)`. */
function compressInto(out: Uint8Array, outAt: number): void {
  for (let i = 16; i < 64; i++) {
    const w15 = W[i - 15]!;
    const w2 = W[i - 2]!;
    const s0 = ((w15 >>> 7) | (w15 << 25)) ^ ((w15 >>> 18) | (w15 << 14)) ^ (w15 >>> 3);
    const s1 = ((w2 >>> 17) | (w2 << 15)) ^ ((w2 >>> 19) | (w2 << 13)) ^ (w2 >>> 10);
    W[i] = (W[i - 16]! + s0 + W[i - 7]! + s1) | 0;
  }
  let a = SHA256_H0[0]!, b = SHA256_H0[1]!, c = SHA256_H0[2]!, d = SHA256_H0[3]!, e = SHA256_H0[4]!, f = SHA256_H0[5]!, g = SHA256_H0[6]!, h = SHA256_H0[7]!;
  for (let i = 0; i < 64; i++) {
    const s1 = ((e >>> 6) | (e << 26)) ^ ((e >>> 11) | (e << 21)) ^ ((e >>> 25) | (e << 7));
    const t1 = (h + s1 + ((e & f) ^ (~e & g)) + SHA256_K[i]! + W[i]!) | 0;
    const s0 = ((a >>> 2) | (a << 30)) ^ ((a >>> 13) | (a << 19)) ^ ((a >>> 22) | (a << 10));
    const t2 = (s0 + ((a & b) ^ (a & c) ^ (b & c))) | 0;
    h = g;
    g = f;
    f = e;
    e = (d + t1) | 0;
    d = c;
    c = b;
    b = a;
    a = (t1 + t2) | 0;
  }
  put(out, outAt, SHA256_H0[0]! + a);
  put(out, outAt + 4, SHA256_H0[1]! + b);
  put(out, outAt + 8, SHA256_H0[2]! + c);
  put(out, outAt + 12, SHA256_H0[3]! + d);
  put(out, outAt + 16, SHA256_H0[4]! + e);
  put(out, outAt + 20, SHA256_H0[5]! + f);
  put(out, outAt + 24, SHA256_H0[6]! + g);
  put(out, outAt + 28, SHA256_H0[7]! + h);
}

function put(out: Uint8Array, at: number, v: number): void {
  out[at] = v >>> 24;
  out[at + 1] = (v >>> 16) & 0xff;
  out[at + 2] = (v >>> 8) & 0xff;
  out[at + 3] = v & 0xff;
}
