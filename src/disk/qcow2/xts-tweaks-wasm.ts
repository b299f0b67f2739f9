import { name, section, uleb } from '../wasm-bytes.js';

/**
 * The XTS tweak arithmetic as a tiny WebAssembly module with 128-bit SIMD: `xorTweaks(t0, src,
 * dst, sectors)` writes dst = src ⊕ T for every 16-byte block of `sectors` 512-byte sectors,
 * where sector s starts at T = t0[s] and each next block multiplies T by α in GF(2^128). XTS
 * needs it twice per run (before and after the ECB pass); in plain JavaScript on 32-bit words it
 * was most of the base writer's CPU. The module is assembled here (a few dozen bytes: no
 * toolchain, nothing downloaded) and checked against OpenSSL's aes-256-xts by the tests.
 */

const I32 = 0x7f;
const V128 = 0x7b;
const op = {
  block: 0x02, loop: 0x03, end: 0x0b, br: 0x0c, brIf: 0x0d, void: 0x40,
  localGet: 0x20, localSet: 0x21, localTee: 0x22, i32Const: 0x41, i32Eqz: 0x45, i32Add: 0x6a, i32Sub: 0x6b,
} as const;
/** SIMD instructions: prefix 0xfd, then the opcode as unsigned LEB128. */
const simd = {
  load: [0xfd, 0x00], store: [0xfd, 0x0b], const: [0xfd, 0x0c], shuffle: [0xfd, 0x0d],
  and: [0xfd, 0x4e], xor: [0xfd, 0x51], i64x2Shl: [0xfd, 0xcb, 0x01], i64x2ShrS: [0xfd, 0xcc, 0x01],
} as const;
/** memarg: alignment hint 2^0 (any address), offset 0. */
const MEMARG = [0x00, 0x00];

// Parameters 0..3: t0, src, dst, sectors; locals 4: T, 5: mask, 6: blocks left in the sector.
const [T0, SRC, DST, SECTORS, T, MASK, LEFT] = [0, 1, 2, 3, 4, 5, 6];

function body(): number[] {
  const get = (i: number) => [op.localGet, i];
  const set = (i: number) => [op.localSet, i];
  const add = (i: number, n: number) => [...get(i), op.i32Const, ...uleb(n), op.i32Add, ...set(i)];
  const lanes64 = (lo: number, hi: number) => {
    const b = Buffer.alloc(16);
    b.writeBigUInt64LE(BigInt(lo), 0);
    b.writeBigUInt64LE(BigInt(hi), 8);
    return [...b];
  };
  const swapHalves = [8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7];
  const code = [
    op.block, op.void,
    op.loop, op.void,
    ...get(SECTORS), op.i32Eqz, op.brIf, 1,
    ...get(T0), ...simd.load, ...MEMARG, ...set(T),
    op.i32Const, 32, ...set(LEFT), // 32 blocks of 16 bytes per 512-byte sector
    op.loop, op.void,
    // dst = src ⊕ T
    ...get(DST), ...get(SRC), ...simd.load, ...MEMARG, ...get(T), ...simd.xor, ...simd.store, ...MEMARG,
    // T = T·α: each 64-bit half shifted left by one; the high half's carry reduces into the low
    // half (x^128 = x^7 + x^2 + x + 1: 0x87), the low half's carry enters the high half.
    ...get(T), op.i32Const, 1, ...simd.i64x2Shl,
    ...get(T), op.i32Const, 63, ...simd.i64x2ShrS, op.localTee, MASK, ...get(MASK), ...simd.shuffle, ...swapHalves,
    ...simd.const, ...lanes64(0x87, 1), ...simd.and,
    ...simd.xor, ...set(T),
    ...add(SRC, 16), ...add(DST, 16),
    ...get(LEFT), op.i32Const, 1, op.i32Sub, op.localTee, LEFT, op.brIf, 0,
    op.end,
    ...add(T0, 16),
    ...get(SECTORS), op.i32Const, 1, op.i32Sub, ...set(SECTORS),
    op.br, 0,
    op.end,
    op.end,
    op.end,
  ];
  const locals = [2, 2, V128, 1, I32]; // two groups: 2 × v128 (T, mask), 1 × i32 (left)
  const fn = [...locals, ...code];
  return [...uleb(fn.length), ...fn];
}

/** The module's bytes: imports memory "m"."mem", exports function "xorTweaks". */
export function xtsTweaksModule(): Uint8Array<ArrayBuffer> {
  const bytes = [
    0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00,
    ...section(1, [1, 0x60, 4, I32, I32, I32, I32, 0]),
    ...section(2, [1, ...name('m'), ...name('mem'), 0x02, 0x00, 1]),
    ...section(3, [1, 0]),
    ...section(7, [1, ...name('xorTweaks'), 0x00, 0]),
    ...section(10, [1, ...body()]),
  ];
  return new Uint8Array(bytes);
}

export type XorTweaks = (t0: number, src: number, dst: number, sectors: number) => void;

/** The module compiled once per thread (every key slot opened or written makes an XtsSectors); null without WebAssembly SIMD. */
let compiled: WebAssembly.Module | null | undefined;
export function compiledXtsTweaks(): WebAssembly.Module | null {
  if (compiled === undefined) {
    const bytes = xtsTweaksModule();
    compiled = WebAssembly.validate(bytes) ? new WebAssembly.Module(bytes) : null;
  }
  return compiled;
}

/** Instantiates the module over `memory`; null where this runtime lacks WebAssembly SIMD. */
export function instantiateXtsTweaks(memory: WebAssembly.Memory): XorTweaks | null {
  const module = compiledXtsTweaks();
  if (!module) return null;
  const instance = new WebAssembly.Instance(module, { m: { mem: memory } });
  return instance.exports.xorTweaks as XorTweaks;
}
