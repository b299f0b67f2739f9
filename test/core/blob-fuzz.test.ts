import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { test } from 'node:test';
import { compress } from 'zstd-napi';
import { openBlob } from '../../src/core/chunks/blob.js';
import { computeChunkId } from '../../src/core/chunk-id.js';
import { MAX_CHUNK_SIZE } from '../../src/core/chunks/chunking.js';
import { MAX_DELTA_BODY, openPages } from '../../src/core/chunks/delta.js';
import { CarryonError } from '../../src/core/errors.js';
import { generateLineageKeys } from '../../src/core/keys.js';
import { FrameDecoder } from '../../src/core/chunks/frames.js';
import { rawChunkBlob, rawPagesBlob, rleBomb, RLE_BLOCK, seeded, withDeclaredSize, type Rand } from '../support/hostile-zstd.js';

/**
 * Fuzz of the decompression bounds (issue 22): authentic envelopes (the attacker holds the
 * lineage keys) around hostile zstd frames and hostile pages bodies, and hostile frame streams.
 * Every case ends in a value within its bound or a CarryonError; nothing else may escape, and
 * memory stays within a loose limit. Seeded: a failure names the seed and case to replay.
 */
const SEED = Number(process.env.CARRYON_FUZZ_SEED ?? 22);
const CASES = 2000;
const keys = generateLineageKeys();
const baseId = computeChunkId(keys.idKey, Buffer.alloc(8));
const newId = computeChunkId(keys.idKey, Buffer.alloc(9));

/** A pages / delta body: newLength u32 ‖ count u16 ‖ (offset u32, length u32) × count ‖ bytes, with hostile fields. */
function hostileBody(r: Rand): Buffer {
  const count = r.pick([0, 1, 2, 3, 1024, 65535]);
  const tableEntries = Math.min(count, r.pick([0, 1, count, 1024]));
  const body = Buffer.alloc(6 + tableEntries * 8 + r.pick([0, 1, 4096, 65536]));
  body.writeUInt32BE(r.pick([0, 1, 4096, MAX_CHUNK_SIZE, MAX_CHUNK_SIZE + 1, 0xffffffff]), 0);
  body.writeUInt16BE(count, 4);
  for (let i = 0; i < tableEntries; i++) {
    body.writeUInt32BE(r.pick([0, 4096 * i, 0xfffff000, r.int(2 ** 32)]), 6 + i * 8);
    body.writeUInt32BE(r.pick([0, 1, 4096, MAX_CHUNK_SIZE, 0xffffffff]), 10 + i * 8);
  }
  return body;
}

let pool: Buffer[] | null = null;
/** Honest frames to mutate, compressed once (compressing a 4 MiB chunk each case was most of the run). */
function honestFrames(r: Rand): Buffer[] {
  pool ??= [Buffer.alloc(1), Buffer.alloc(4096), Buffer.alloc(MAX_CHUNK_SIZE), randomBytes(8192), ...Array.from({ length: 8 }, () => hostileBody(r))]
    .flatMap((plain) => [1, 3].map((level) => compress(plain, { compressionLevel: level })));
  return pool;
}

/** A hostile zstd body: bombs of any ratio, lies about the size, mutations of honest frames, joins, garbage. */
function hostileFrame(r: Rand): Buffer {
  const honest = () => r.pick(honestFrames(r));
  // Choices are thunks: only the one picked is built.
  switch (r.int(8)) {
    case 0: return rleBomb({ blocks: r.pick([1, 31, 32, 33, 2048, 40_000]), declare: r.pick(['none', 'true', r.int(MAX_DELTA_BODY + 2), 2 ** 40]) as 'none' });
    case 1: return withDeclaredSize(honest(), r.pick([0, 1, r.int(MAX_DELTA_BODY), MAX_DELTA_BODY + 1, 2 ** 32 + 5, 2 ** 52]), r);
    case 2: {
      const f = Buffer.from(honest());
      for (let i = r.int(8) + 1; i > 0; i--) f[r.int(f.length)] = r.int(256);
      return f;
    }
    case 3: {
      const f = honest();
      return f.subarray(0, r.int(f.length));
    }
    case 4: return Buffer.concat([honest(), r.pick([honest, () => rleBomb({ blocks: 33, declare: 'true' }), () => r.bytes(r.int(16) + 1)])()]);
    // A skippable frame (magic 0x184D2A5?) of any declared length, then maybe a real one.
    case 5: {
      const skip = Buffer.alloc(8 + r.int(64));
      skip.writeUInt32LE(0x184d2a50 + r.int(16), 0);
      skip.writeUInt32LE(r.pick([skip.length - 8, 0, 0xffffffff]), 4);
      return r.int(2) ? Buffer.concat([skip, honest()]) : skip;
    }
    case 6: return r.bytes(r.int(256));
    default: return r.pick(honestFrames(r));
  }
}

/** Opens `inner` as a chunk body, or as a pages body against zeros or against a base; returns the output length, or throws. */
function open(r: Rand, inner: Buffer): number {
  switch (r.int(3)) {
    case 0: return openBlob(keys, newId, rawChunkBlob(keys, newId, inner)).length;
    case 1: return openPages(keys, r.int(2) ? baseId : null, rawPagesBlob(keys, inner, null), r.int(2) ? Buffer.alloc(RLE_BLOCK) : null, 'fuzz').length;
    default: return openPages(keys, baseId, rawPagesBlob(keys, inner, baseId), Buffer.alloc(RLE_BLOCK), 'fuzz').length;
  }
}

test(`blob and pages fuzz (seed ${SEED}, ${CASES} cases): only CarryonError refusals, nothing past its bound, memory bounded`, () => {
  const r = seeded(SEED);
  const base = process.memoryUsage();
  let peak = 0;
  let slowest = 0;
  const refused = new Map<string, number>();
  const t0 = performance.now();
  for (let i = 0; i < CASES; i++) {
    const inner = hostileFrame(r);
    const c0 = performance.now();
    try {
      const n = open(r, inner);
      assert.ok(n <= MAX_CHUNK_SIZE, `case ${i}: ${n} bytes out`);
    } catch (err) {
      if (!(err instanceof CarryonError)) assert.fail(`case ${i} (seed ${SEED}) escaped as ${(err as Error).name}: ${(err as Error).message}`);
      const reason = /\(([a-z-]+)\)/.exec(err.message)?.[1] ?? err.code;
      refused.set(reason, (refused.get(reason) ?? 0) + 1);
    }
    // A bomb decompressed before its size is checked takes seconds (2.3 s for 256 MiB here).
    slowest = Math.max(slowest, performance.now() - c0);
    if (i % 50 === 0) {
      const m = process.memoryUsage();
      peak = Math.max(peak, m.rss - base.rss, m.arrayBuffers - base.arrayBuffers);
    }
  }
  const ms = performance.now() - t0;
  // Each case may hold a few MiB (an honest 4 MiB chunk); a bomb let through would hold 256 MiB or more.
  assert.ok(peak < 192 * 2 ** 20, `memory grew by ${(peak / 2 ** 20).toFixed(0)} MiB`);
  assert.ok(slowest < 500, `the slowest case took ${slowest.toFixed(0)} ms`);
  assert.ok(ms < 20_000, `${ms.toFixed(0)} ms`);
  for (const reason of ['too-large', 'decompress', 'delta']) assert.ok((refused.get(reason) ?? 0) > 0, `some cases refused as ${reason}: ${JSON.stringify([...refused])}`);
});

test(`frame stream fuzz (seed ${SEED}): hostile types, lengths and splits end in frames or a FrameError`, () => {
  const r = seeded(SEED + 1);
  for (let i = 0; i < 400; i++) {
    const parts: Buffer[] = [];
    for (let k = r.int(6); k >= 0; k--) {
      const head = Buffer.alloc(37);
      head[0] = r.pick([0, 1, 2, 3, 4, 5, 255]);
      r.bytes(32).copy(head, 1);
      const len = r.pick([0, 3, 4, 31, 32, 100, 4096, MAX_DELTA_BODY + 100, 0xffffffff]);
      head.writeUInt32BE(len, 33);
      parts.push(head, r.bytes(Math.min(len, r.pick([0, 64, 4096]))));
    }
    const stream = Buffer.concat(parts);
    const decoder = new FrameDecoder();
    try {
      for (let at = 0; at < stream.length;) {
        const step = r.int(200) + 1;
        decoder.push(stream.subarray(at, at + step));
        at += step;
      }
      decoder.finish();
    } catch (err) {
      if (!(err instanceof CarryonError)) assert.fail(`stream ${i} (seed ${SEED}) escaped as ${(err as Error).name}: ${(err as Error).message}`);
      assert.equal(err.code, 'bad-frame');
    }
  }
});
