import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { test } from 'node:test';
import { compress } from 'zstd-napi';
import { openBlob, sealChunk } from '../../src/core/chunks/blob.js';
import { computeChunkId } from '../../src/core/chunk-id.js';
import { MAX_CHUNK_SIZE } from '../../src/core/chunks/chunking.js';
import { MAX_DELTA_BODY, openPages, sealPages } from '../../src/core/chunks/delta.js';
import { BlobError } from '../../src/core/errors.js';
import { generateLineageKeys } from '../../src/core/keys.js';
import { decompressBounded } from '../../src/core/chunks/zstd-bounded.js';
import { rawChunkBlob, rawPagesBlob, rleBomb, RLE_BLOCK } from '../support/hostile-zstd.js';

const keys = generateLineageKeys();

/** Runs `fn`, which must throw a BlobError of `reason`; returns how long it took and how much memory it left. */
function refused(fn: () => unknown, reason: string, pattern: RegExp): { ms: number; grewMiB: number } {
  const before = process.memoryUsage();
  const t0 = performance.now();
  assert.throws(fn, (err: unknown) => err instanceof BlobError && err.code === 'bad-blob' && err.reason === reason && pattern.test(err.message));
  const after = process.memoryUsage();
  return { ms: performance.now() - t0, grewMiB: (Math.max(after.rss - before.rss, after.arrayBuffers - before.arrayBuffers)) / 2 ** 20 };
}

test('decompression bomb (issue 22): an 8 KiB pages blob of RLE blocks asking for 256 MiB is refused at once, memory flat', () => {
  const noSize = rawPagesBlob(keys, rleBomb({ blocks: 2048 }));
  assert.ok(noSize.length < 8300, `${noSize.length} bytes`);
  const a = refused(() => openPages(keys, null, noSize, null, 'bomb'), 'decompress', /does not declare its size/);
  // Declaring its true size (256 MiB) is over the bound: refused before any byte is made.
  const b = refused(() => openPages(keys, null, rawPagesBlob(keys, rleBomb({ blocks: 2048, declare: 'true' })), null, 'bomb'), 'too-large', /declares 268435456 bytes/);
  // A header that lies (declares 64 KiB, holds 256 MiB): zstd stops at the 64 KiB it was given.
  const c = refused(() => openPages(keys, null, rawPagesBlob(keys, rleBomb({ blocks: 2048, declare: 65536 })), null, 'bomb'), 'decompress', /./);
  for (const r of [a, b, c]) {
    assert.ok(r.ms < 200, `refused in ${r.ms.toFixed(0)} ms`);
    assert.ok(r.grewMiB < 16, `memory grew by ${r.grewMiB.toFixed(0)} MiB`);
  }
});

test('a chunk blob is bounded by the chunk size: a frame declaring one byte more is refused', () => {
  const id = computeChunkId(keys.idKey, Buffer.alloc(16));
  const over = MAX_CHUNK_SIZE / RLE_BLOCK + 1;
  refused(() => openBlob(keys, id, rawChunkBlob(keys, id, rleBomb({ blocks: over, declare: 'true' }))), 'too-large', /at most 4194304/);
  // Exactly the chunk size decompresses (then fails its ID, as any wrong content does).
  assert.throws(() => openBlob(keys, id, rawChunkBlob(keys, id, rleBomb({ blocks: over - 1, declare: 'true' }))), /id-mismatch/);
});

test('one frame only: two frames, trailing bytes and non-zstd bodies are refused', () => {
  const one = compress(Buffer.from('hello'));
  assert.equal(decompressBounded(one, 5).toString(), 'hello');
  assert.throws(() => decompressBounded(Buffer.concat([one, one]), 10), /bytes after the zstd frame/);
  assert.throws(() => decompressBounded(Buffer.concat([one, Buffer.from([0])]), 10), /after the zstd frame/);
  assert.throws(() => decompressBounded(randomBytes(64), 10), /not one whole zstd frame/);
  assert.throws(() => decompressBounded(one.subarray(0, one.length - 2), 10), /not one whole zstd frame/);
  assert.throws(() => decompressBounded(one, 4), /declares 5 bytes \(at most 4/);
});

test('honest blobs still open: empty, random, compressible, a whole chunk of zero pages', () => {
  for (const plain of [Buffer.alloc(1), randomBytes(70_000), Buffer.alloc(MAX_CHUNK_SIZE, 7)]) {
    const s = sealChunk(keys, plain);
    assert.ok(openBlob(keys, s.id, s.blob).equals(plain));
  }
  const zeros = Buffer.alloc(MAX_CHUNK_SIZE);
  const pages = sealPages(keys, null, MAX_CHUNK_SIZE, [{ offset: 0, bytes: zeros }]);
  assert.ok(pages.length < 4096, 'a whole chunk of zeros compresses to a few hundred bytes');
  assert.ok(openPages(keys, null, pages, null, 'zeros').equals(zeros));
  assert.ok(MAX_DELTA_BODY > MAX_CHUNK_SIZE);
});
