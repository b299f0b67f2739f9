import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { test } from 'node:test';
import { openBlob, sealBlobEnvelope, sealChunk } from '../../src/core/chunks/blob.js';
import { chunkIdToBytes, computeChunkId } from '../../src/core/chunk-id.js';
import { FLAG_PAGES, openPages, pagesByChunk, sealPages } from '../../src/core/chunks/delta.js';
import { BlobError } from '../../src/core/errors.js';
import { generateLineageKeys } from '../../src/core/keys.js';

const keys = generateLineageKeys();
const CS = 256 * 1024;

function changed(base: Buffer, writes: [number, number][]): Buffer {
  const next = Buffer.from(base);
  for (const [off, len] of writes) randomBytes(len).copy(next, off);
  return next;
}

test('pages round trip: only the written pages travel; rebuilt on the base, or on zeros', () => {
  const base = randomBytes(CS);
  const baseId = computeChunkId(keys.idKey, base);
  const next = changed(base, [[4096, 3000], [200_704, 9000]]);
  const pieces = [{ offset: 4096, bytes: next.subarray(4096, 8192) }, { offset: 200_704, bytes: next.subarray(200_704, 212_992) }];
  const pages = sealPages(keys, baseId, CS, pieces);
  assert.ok(pages.length < 4096 * 4 + 200, `pages blob is ${pages.length} bytes for one page and one 12 KiB run`);
  assert.ok(openPages(keys, baseId, pages, base, 'round trip').equals(next));
  // Against zeros (the checkpoint had a hole there), and a short last chunk.
  const fresh = sealPages(keys, null, 10_000, [{ offset: 8192, bytes: next.subarray(0, 1808) }]);
  const expected = Buffer.alloc(10_000);
  next.copy(expected, 8192, 0, 1808);
  assert.ok(openPages(keys, null, fresh, null, 'hole').equals(expected));
  assert.throws(() => sealPages(keys, baseId, CS, [{ offset: 8192, bytes: Buffer.alloc(4096) }, { offset: 4096, bytes: Buffer.alloc(8192) }]), /overlapping/);
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

test('pages tamper cases: wrong base, flipped bytes, other keys, kind confusion, bad range tables', () => {
  const base = randomBytes(CS);
  const baseId = computeChunkId(keys.idKey, base);
  const pages = sealPages(keys, baseId, CS, [{ offset: 8192, bytes: randomBytes(4096) }]);
  const label = 'chunk #7';
  const reason = (r: string) => (e: unknown) => e instanceof BlobError && e.reason === r && e.chunkId === label;
  // The base's ID is authenticated: pages sealed against one base do not open against another, nor against none.
  assert.throws(() => openPages(keys, 'a'.repeat(64), pages, base, label), reason('auth'), 'base ID is authenticated');
  assert.throws(() => openPages(keys, null, pages, null, label), reason('auth'));
  const flipped = Buffer.from(pages);
  flipped[flipped.length - 20]! ^= 1;
  assert.throws(() => openPages(keys, baseId, flipped, base, label), reason('auth'));
  assert.throws(() => openPages({ ...keys, dataKey: randomBytes(32) }, baseId, pages, base, label), reason('auth'));
  // A pages blob is not a chunk blob and a chunk blob is not a pages blob; nor is a retired delta (flag 0x02).
  assert.throws(() => openBlob(keys, baseId, pages), (e: unknown) => e instanceof BlobError && e.reason === 'flags');
  const blob = sealChunk(keys, base).blob;
  assert.throws(() => openPages(keys, baseId, blob, base, label), reason('flags'));
  const retiredDelta = sealBlobEnvelope(keys, Buffer.alloc(6), 0x02, Buffer.concat([chunkIdToBytes(baseId), chunkIdToBytes(baseId)])).blob;
  assert.throws(() => openPages(keys, baseId, retiredDelta, base, label), reason('flags'));
  // Authentic envelopes with nonsense inside (only a key holder could make them) are still refused.
  const craft = (body: Buffer) => sealBlobEnvelope(keys, body, FLAG_PAGES, chunkIdToBytes(baseId)).blob;
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
    assert.throws(() => openPages(keys, baseId, craft(body), base, label), reason('delta'), name);
  }
});
