import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { test } from 'node:test';
import { openBlob, sealBlobEnvelope, sealChunk } from '../../src/core/blob.js';
import { chunkIdToBytes, computeChunkId } from '../../src/core/chunk-id.js';
import { changedRanges, FLAG_DELTA, openDelta, pagesByChunk, sealDelta, sealDeltaRanges } from '../../src/core/delta.js';
import { BlobError } from '../../src/core/errors.js';
import { generateLineageKeys } from '../../src/core/keys.js';

const keys = generateLineageKeys();
const CS = 256 * 1024;

function changed(base: Buffer, writes: [number, number][]): Buffer {
  const next = Buffer.from(base);
  for (const [off, len] of writes) randomBytes(len).copy(next, off);
  return next;
}

test('changedRanges: page-aligned, adjacent pages merged, short last page', () => {
  const base = randomBytes(CS);
  assert.deepEqual(changedRanges(base, base), []);
  assert.deepEqual(changedRanges(base, changed(base, [[1000, 5000]])), [{ offset: 0, length: 8192 }]);
  assert.deepEqual(changedRanges(base, changed(base, [[4096, 1], [3 * 4096, 1], [4 * 4096 + 7, 1]])), [{ offset: 4096, length: 4096 }, { offset: 3 * 4096, length: 8192 }]);
  const short = randomBytes(10_000);
  assert.deepEqual(changedRanges(short, changed(short, [[9_999, 1]])), [{ offset: 8192, length: 10_000 - 8192 }]);
});

test('delta round trip: only changed pages travel; the rebuilt chunk hashes to the new ID', () => {
  const base = randomBytes(CS);
  const baseId = computeChunkId(keys.idKey, base);
  const next = changed(base, [[100, 3000], [200_000, 9000]]);
  const newId = computeChunkId(keys.idKey, next);
  const delta = sealDelta(keys, newId, baseId, base, next)!;
  assert.ok(delta.length < 4096 * 5 + 200, `delta is ${delta.length} bytes for 3 changed pages + one 12 KiB run`);
  assert.ok(openDelta(keys, newId, baseId, delta, base).equals(next));
  // A chunk mostly rewritten is not worth a delta.
  assert.equal(sealDelta(keys, newId, baseId, base, changed(base, [[0, CS * 0.75]])), null);
});

test('pagesByChunk: extents split at chunk borders, widened to pages, clipped to a short last chunk', () => {
  const disk = 3 * CS + 10_000;
  const pages = pagesByChunk([
    { offset: 100, length: 10 }, // one page of chunk 0
    { offset: 4096, length: 4096 }, // the next page: merged with the first
    { offset: CS - 512, length: 1024 }, // across the border of chunks 0 and 1
    { offset: 3 * CS + 9_000, length: 5_000 }, // runs past the disk's end
  ], CS, disk);
  assert.deepEqual([...pages.keys()], [0, 1, 3]);
  assert.deepEqual(pages.get(0), [{ offset: 0, length: 8192 }, { offset: CS - 4096, length: 4096 }]);
  assert.deepEqual(pages.get(1), [{ offset: 0, length: 4096 }]);
  assert.deepEqual(pages.get(3), [{ offset: 8192, length: 10_000 - 8192 }]);
  // One extent over many chunks: every chunk whole.
  const big = pagesByChunk([{ offset: 0, length: 2 * CS }], CS, disk);
  assert.deepEqual([...big.values()], [[{ offset: 0, length: CS }], [{ offset: 0, length: CS }]]);
});

test('sealDeltaRanges: the written pages alone rebuild the chunk; a range the writer missed fails the ID check', () => {
  const base = randomBytes(CS);
  const baseId = computeChunkId(keys.idKey, base);
  const next = changed(base, [[8192, 4096], [65_536, 100]]);
  const newId = computeChunkId(keys.idKey, next);
  const written = [{ offset: 8192, length: 4096 }, { offset: 65_536, length: 4096 }];
  assert.ok(openDelta(keys, newId, baseId, sealDeltaRanges(keys, newId, baseId, next, written)!, base).equals(next));
  // Pages written with the same bytes again only cost bytes, never correctness.
  assert.ok(openDelta(keys, newId, baseId, sealDeltaRanges(keys, newId, baseId, next, [{ offset: 0, length: 81_920 }])!, base).equals(next));
  const missed = sealDeltaRanges(keys, newId, baseId, next, written.slice(0, 1))!;
  assert.throws(() => openDelta(keys, newId, baseId, missed, base), (e: unknown) => e instanceof BlobError && /does not hash/.test(e.message));
  assert.throws(() => sealDeltaRanges(keys, newId, baseId, next, [{ offset: 8192, length: 4096 }, { offset: 4096, length: 8192 }]), /overlapping/);
  assert.equal(sealDeltaRanges(keys, newId, baseId, next, [{ offset: 0, length: CS }]), null);
});

test('delta tamper cases: wrong base, wrong IDs, flipped bytes, kind confusion, bad range tables', () => {
  const base = randomBytes(CS);
  const baseId = computeChunkId(keys.idKey, base);
  const next = changed(base, [[8192, 100]]);
  const newId = computeChunkId(keys.idKey, next);
  const delta = sealDelta(keys, newId, baseId, base, next)!;
  const reason = (r: string) => (e: unknown) => e instanceof BlobError && e.reason === r && e.chunkId === newId;
  const otherBase = randomBytes(CS);
  assert.throws(() => openDelta(keys, newId, baseId, delta, otherBase), reason('id-mismatch'), 'applied to the wrong base');
  assert.throws(() => openDelta(keys, newId, 'a'.repeat(64), delta, base), reason('auth'), 'base ID is authenticated');
  const flipped = Buffer.from(delta);
  flipped[flipped.length - 20]! ^= 1;
  assert.throws(() => openDelta(keys, newId, baseId, flipped, base), reason('auth'));
  assert.throws(() => openDelta({ ...keys, dataKey: randomBytes(32) }, newId, baseId, delta, base), reason('auth'));
  // A delta is not a chunk blob and a chunk blob is not a delta.
  assert.throws(() => openBlob(keys, newId, delta), (e: unknown) => e instanceof BlobError && e.reason === 'flags');
  const blob = sealChunk(keys, next).blob;
  assert.throws(() => openDelta(keys, newId, baseId, blob, base), reason('flags'));
  // Authentic envelopes with nonsense inside (only a key holder could make them) are still refused.
  const craft = (body: Buffer) => sealBlobEnvelope(keys, body, FLAG_DELTA, Buffer.concat([chunkIdToBytes(newId), chunkIdToBytes(baseId)])).blob;
  const table = (len: number, ranges: [number, number][], data = 0) => {
    const b = Buffer.alloc(6 + ranges.length * 8 + data);
    b.writeUInt32BE(len, 0);
    b.writeUInt16BE(ranges.length, 4);
    ranges.forEach(([o, l], i) => { b.writeUInt32BE(o, 6 + i * 8); b.writeUInt32BE(l, 10 + i * 8); });
    return b;
  };
  for (const [name, body] of [
    ['short body', Buffer.alloc(3)],
    ['zero length', table(0, [])],
    ['oversize chunk', table(8 * 1024 * 1024, [])],
    ['range past the end', table(CS, [[CS - 10, 20]], 20)],
    ['overlapping ranges', table(CS, [[0, 100], [50, 100]], 200)],
    ['data missing', table(CS, [[0, 100]], 10)],
    ['trailing bytes', table(CS, [[0, 100]], 150)],
  ] as [string, Buffer][]) {
    assert.throws(() => openDelta(keys, newId, baseId, craft(body), base), reason('delta'), name);
  }
});
