import assert from 'node:assert/strict';
import { test } from 'node:test';
import { ALL_ALLOCATED, allocatedOf, bitmapOf, coverSubclusters, touchedSubclusters, zerosAndPieces } from '../../src/disk/qcow2/subclusters.js';

const SUB = 8192;
const bytes = (n: number, v: number) => new Uint8Array(n).fill(v);

test('the bitmap word: allocated subclusters in the low half, every other one reads as zeros', () => {
  assert.equal(bitmapOf(0xffff_ffff), ALL_ALLOCATED);
  assert.equal(bitmapOf(0), 0xffff_ffffn << 32n);
  assert.equal(bitmapOf(0b101), 0b101n | ((0xffff_ffffn & ~0b101n) << 32n));
  assert.equal(allocatedOf(bitmapOf(0x8000_0001)), 0x8000_0001);
});

test('touched subclusters: a piece across a boundary touches both, an empty one none', () => {
  assert.equal(touchedSubclusters([{ offset: SUB - 512, bytes: bytes(1024, 1) }], SUB), 0b11);
  assert.equal(touchedSubclusters([{ offset: 31 * SUB, bytes: bytes(SUB, 1) }, { offset: 0, bytes: bytes(0, 1) }], SUB), 0x8000_0000);
});

test('covering subclusters: those asked are written whole, zeros around the pieces; the rest of each piece is kept as it is', () => {
  const a = { offset: 512, bytes: bytes(1024, 1) };
  const b = { offset: SUB - 512, bytes: bytes(SUB + 1024, 2) }; // subclusters 0, 1 and 2
  const out = coverSubclusters([a, b], 0b001, SUB);
  // Subcluster 0 whole (a and b's head inside), b's tail past it as given.
  assert.deepEqual(out.map((p) => [p.offset, p.bytes.length]), [[0, SUB], [SUB, SUB + 512]]);
  const whole = Buffer.from(out[0]!.bytes);
  assert.ok(whole.subarray(0, 512).equals(Buffer.alloc(512)));
  assert.ok(whole.subarray(512, 1536).equals(Buffer.alloc(1024, 1)));
  assert.ok(whole.subarray(1536, SUB - 512).equals(Buffer.alloc(SUB - 2048)));
  assert.ok(whole.subarray(SUB - 512).equals(Buffer.alloc(512, 2)));
  assert.equal(out[1]!.bytes.buffer, b.bytes.buffer, 'a view of the piece, not a copy');
  // A run of two, the piece's middle in an untouched one: split around it.
  const c = coverSubclusters([{ offset: 0, bytes: bytes(3 * SUB, 3) }], 0b101, SUB);
  assert.deepEqual(c.map((p) => [p.offset, p.bytes.length]), [[0, SUB], [SUB, SUB], [2 * SUB, SUB]]);
  assert.deepEqual(coverSubclusters([a], 0, SUB), [a]);
});

test('zeros and pieces make the whole chunk, in a given buffer when it is large enough', () => {
  const into = Buffer.alloc(4096, 0xee);
  const out = zerosAndPieces(into, 2048, [{ offset: 512, bytes: bytes(512, 7) }]);
  assert.equal(out.buffer, into.buffer);
  assert.ok(out.equals(Buffer.concat([Buffer.alloc(512), Buffer.alloc(512, 7), Buffer.alloc(1024)])));
  assert.equal(zerosAndPieces(Buffer.alloc(10), 2048, []).length, 2048);
});
