import { SHA256_H0 as H0, SHA256_K as K } from './sha256-short.js';
import { name, section, sleb, uleb } from './wasm-bytes.js';

/**
 * LUKS1's anti-forensic chain with SHA-256 as a small WebAssembly module: for a 64-byte key and
 * its stripes, d = diffuse(d ⊕ stripe) over every stripe but the last (cryptsetup's AF_merge and
 * AF_split share it; the key is then d ⊕ the last stripe). Every key slot opened or written pays
 * it: 4000 stripes, 8000 SHA-256 blocks.
 *
 * Why: in JavaScript (sha256-short.ts) it runs at ≈ 3.5 ms once V8 has optimised the loop, but a
 * command opens its first key slot in a fresh process, where the same loop ran 12–28 ms in V8's
 * interpreter, and a check-out's take-over opens and writes several. WebAssembly is compiled before
 * it runs. The module is assembled here (no toolchain, nothing downloaded); the tests compare it
 * with the JavaScript diffuse and with Node's SHA-256.
 */

const I32 = 0x7f;
const op = {
  block: 0x02, loop: 0x03, end: 0x0b, br: 0x0c, brIf: 0x0d, void: 0x40, call: 0x10,
  localGet: 0x20, localSet: 0x21, localTee: 0x22, i32Load: 0x28, i32Store: 0x36, i32Const: 0x41,
  i32Eqz: 0x45, i32LtU: 0x49, i32Add: 0x6a, i32Sub: 0x6b, i32And: 0x71, i32Or: 0x72, i32Xor: 0x73, i32ShrU: 0x76,
  i32Rotl: 0x77, i32Rotr: 0x78,
} as const;

/** Memory layout: the message schedule W, the round constants K, the chain value d, then the stripes. */
const W_AT = 64; // past 64 bytes of nothing: W[i - 16] is then a non-negative offset from 4·i
const K_AT = 320;
const D_AT = 576;
const STRIPES_AT = 1024;
const KEY_BYTES = 64;

const get = (i: number) => [op.localGet, i];
const set = (i: number) => [op.localSet, i];
const tee = (i: number) => [op.localTee, i];
const c = (n: number) => [op.i32Const, ...sleb(n)];
/** Loads and stores: alignment 2^2, constant offset. */
const load = (offset: number) => [op.i32Load, 2, ...uleb(offset)];
const store = (offset: number) => [op.i32Store, 2, ...uleb(offset)];
/** rotr(x, a) ⊕ rotr(x, b) ⊕ (x >>> s or rotr x, r) with x in local `x`. */
const sigma = (x: number, a: number, b: number, last: number[]) => [...get(x), ...c(a), op.i32Rotr, ...get(x), ...c(b), op.i32Rotr, op.i32Xor, ...get(x), ...last, op.i32Xor];
/** Byte swap of the i32 on the stack (SHA-256 is big-endian, WebAssembly little-endian), via local `t`. */
const bswap = (t: number) => [...tee(t), ...c(8), op.i32Rotl, ...c(0x00ff00ff), op.i32And, ...get(t), ...c(8), op.i32Rotr, ...c(0xff00ff00 | 0), op.i32And, op.i32Or];

/** func 0, compress(dst): the block in W[0, 16) → its SHA-256, big-endian, at dst. */
function compressBody(): number[] {
  const DST = 0;
  const [I, X, Y, T1, A, B, CC, D, E, F, G, H] = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12];
  const code = [
    // Message schedule: W[i] = W[i-16] + σ0(W[i-15]) + W[i-7] + σ1(W[i-2]), i = 16..63 (I holds 4·i).
    ...c(64), ...set(I),
    op.loop, op.void,
    ...get(I), ...get(I), ...load(W_AT - 64),
    ...get(I), ...load(W_AT - 60), ...set(X), ...sigma(X, 7, 18, [...c(3), op.i32ShrU]), op.i32Add,
    ...get(I), ...load(W_AT - 28), op.i32Add,
    ...get(I), ...load(W_AT - 8), ...set(Y), ...sigma(Y, 17, 19, [...c(10), op.i32ShrU]), op.i32Add,
    ...store(W_AT),
    ...get(I), ...c(4), op.i32Add, ...tee(I), ...c(256), op.i32LtU, op.brIf, 0,
    op.end,
    ...[A, B, CC, D, E, F, G, H].flatMap((l, j) => [...c(H0[j]!), ...set(l)]),
    ...c(0), ...set(I),
    op.loop, op.void,
    // T1 = h + Σ1(e) + ch(e, f, g) + K[i] + W[i]
    ...get(H), ...sigma(E, 6, 11, [...c(25), op.i32Rotr]), op.i32Add,
    ...get(E), ...get(F), op.i32And, ...get(E), ...c(-1), op.i32Xor, ...get(G), op.i32And, op.i32Xor, op.i32Add,
    ...get(I), ...load(K_AT), op.i32Add, ...get(I), ...load(W_AT), op.i32Add, ...set(T1),
    // T2 = Σ0(a) + maj(a, b, c), kept in X
    ...sigma(A, 2, 13, [...c(22), op.i32Rotr]),
    ...get(A), ...get(B), op.i32And, ...get(A), ...get(CC), op.i32And, op.i32Xor, ...get(B), ...get(CC), op.i32And, op.i32Xor, op.i32Add, ...set(X),
    ...get(G), ...set(H), ...get(F), ...set(G), ...get(E), ...set(F),
    ...get(D), ...get(T1), op.i32Add, ...set(E),
    ...get(CC), ...set(D), ...get(B), ...set(CC), ...get(A), ...set(B),
    ...get(T1), ...get(X), op.i32Add, ...set(A),
    ...get(I), ...c(4), op.i32Add, ...tee(I), ...c(256), op.i32LtU, op.brIf, 0,
    op.end,
    ...[A, B, CC, D, E, F, G, H].flatMap((l, j) => [...get(DST), ...get(l), ...c(H0[j]!), op.i32Add, ...bswap(Y), ...store(4 * j)]),
    op.end,
  ];
  const fn = [1, 12, I32, ...code]; // one group of 12 i32 locals
  return [...uleb(fn.length), ...fn];
}

/** func 1, chain(stripes, count): d (at D_AT, zero on entry) = diffuse(d ⊕ stripe) for `count` stripes from `stripes`. */
function chainBody(): number[] {
  const [SRC, COUNT, T] = [0, 1, 2];
  const piece = (p: number) => [
    ...c(W_AT), ...c(p), ...store(0),
    ...Array.from({ length: 8 }, (_, k) => [...c(W_AT), ...c(D_AT), ...load(32 * p + 4 * k), ...bswap(T), ...store(4 + 4 * k)]).flat(),
    ...c(W_AT), ...c(0x80000000 | 0), ...store(36),
    ...[40, 44, 48, 52, 56].flatMap((at) => [...c(W_AT), ...c(0), ...store(at)]),
    ...c(W_AT), ...c((4 + 32) * 8), ...store(60),
    ...c(D_AT + 32 * p), op.call, 0,
  ];
  const code = [
    op.block, op.void,
    op.loop, op.void,
    ...get(COUNT), op.i32Eqz, op.brIf, 1,
    ...Array.from({ length: 16 }, (_, k) => [...c(D_AT), ...c(D_AT), ...load(4 * k), ...get(SRC), ...load(4 * k), op.i32Xor, ...store(4 * k)]).flat(),
    ...piece(0),
    ...piece(1),
    ...get(SRC), ...c(KEY_BYTES), op.i32Add, ...set(SRC),
    ...get(COUNT), ...c(1), op.i32Sub, ...set(COUNT),
    op.br, 0,
    op.end,
    op.end,
    op.end,
  ];
  const fn = [1, 1, I32, ...code];
  return [...uleb(fn.length), ...fn];
}

/** The module's bytes: imports memory "m"."mem", exports function "chain". */
export function afSha256Module(): Uint8Array<ArrayBuffer> {
  return new Uint8Array([
    0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00,
    ...section(1, [2, 0x60, 1, I32, 0, 0x60, 2, I32, I32, 0]),
    ...section(2, [1, ...name('m'), ...name('mem'), 0x02, 0x00, 1]),
    ...section(3, [2, 0, 1]),
    ...section(7, [1, ...name('chain'), 0x00, 1]),
    ...section(10, [2, ...compressBody(), ...chainBody()]),
  ]);
}

interface AfModule {
  memory: WebAssembly.Memory;
  chain: (stripes: number, count: number) => void;
}

/** One instance per thread, made at first use; null where this runtime has no WebAssembly. */
let made: AfModule | null | undefined;
function afModule(): AfModule | null {
  if (made !== undefined) return made;
  made = null;
  if (typeof WebAssembly !== 'object') return made;
  const memory = new WebAssembly.Memory({ initial: 1 });
  const instance = new WebAssembly.Instance(new WebAssembly.Module(afSha256Module()), { m: { mem: memory } });
  const view = new DataView(memory.buffer);
  K.forEach((k, i) => view.setInt32(K_AT + 4 * i, k, true));
  made = { memory, chain: instance.exports.chain as AfModule['chain'] };
  return made;
}

/**
 * The chain value after the first `stripes - 1` of `material`'s 64-byte stripes (SHA-256
 * diffuse), or null where WebAssembly is missing (the caller then runs the JavaScript diffuse).
 */
export function afChainSha256(material: Uint8Array, stripes: number): Buffer | null {
  if (!Number.isInteger(stripes) || stripes < 1 || material.length < stripes * KEY_BYTES) throw new RangeError(`afChainSha256: ${stripes} stripes of ${KEY_BYTES} bytes need ${stripes * KEY_BYTES} bytes, got ${material.length}`);
  const m = afModule();
  if (!m) return null;
  const end = STRIPES_AT + (stripes - 1) * KEY_BYTES;
  const pages = Math.ceil(end / 65536) - m.memory.buffer.byteLength / 65536;
  if (pages > 0) m.memory.grow(pages);
  const mem = new Uint8Array(m.memory.buffer);
  mem.fill(0, D_AT, D_AT + KEY_BYTES);
  mem.set(material.subarray(0, end - STRIPES_AT), STRIPES_AT);
  m.chain(STRIPES_AT, stripes - 1);
  const d = Buffer.from(mem.subarray(D_AT, D_AT + KEY_BYTES));
  // Key material does not stay in the module's memory.
  mem.fill(0, W_AT, K_AT);
  mem.fill(0, D_AT, D_AT + KEY_BYTES);
  mem.fill(0, STRIPES_AT, end);
  return d;
}

/** The module's memory (tests: nothing secret stays in it), or null before first use. */
export function afSha256Memory(): WebAssembly.Memory | null {
  return made?.memory ?? null;
}
