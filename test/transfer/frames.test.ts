import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { test } from 'node:test';
import { MAX_BLOB_SIZE } from '../../src/core/chunks/blob.js';
import { blobFrame, encodeFrame, endFrame, errorFrame, FRAME_BLOB, FRAME_ERROR, FRAME_END, FRAME_PAGES, FrameDecoder, FrameError, pagesFrameHead } from '../../src/core/chunks/frames.js';

const A = 'a'.repeat(64);
const B = 'b'.repeat(64);

test('frames round-trip whatever way the stream is cut', () => {
  const blob = randomBytes(3000);
  const pages = randomBytes(500);
  const wire = Buffer.concat([blobFrame(A, blob), pagesFrameHead(7, B, pages.length), pages, pagesFrameHead(8, null, 0), errorFrame(A, 'not in store'), endFrame()]);
  for (const step of [1, 7, 37, 4096, wire.length]) {
    const d = new FrameDecoder();
    const frames = [];
    for (let i = 0; i < wire.length; i += step) frames.push(...d.push(wire.subarray(i, i + step)));
    d.finish();
    assert.deepEqual(frames.map((f) => f.type), [FRAME_BLOB, FRAME_PAGES, FRAME_PAGES, FRAME_ERROR, FRAME_END]);
    const [b, p, none, e] = frames as unknown as [{ id: string; payload: Buffer }, { tag: number; baseId: string; payload: Buffer }, { tag: number; baseId: null; payload: Buffer }, { message: string }];
    assert.ok(b.payload.equals(blob) && b.id === A);
    assert.ok(p.payload.equals(pages) && p.tag === 7 && p.baseId === B);
    assert.ok(none.payload.length === 0 && none.tag === 8 && none.baseId === null);
    assert.equal(e.message, 'not in store');
  }
});

test('malformed streams are refused with a FrameError, never mis-read', () => {
  const bad = (wire: Buffer, finish = false) => () => {
    const d = new FrameDecoder();
    d.push(wire);
    if (finish) d.finish();
  };
  assert.throws(bad(encodeFrame(9, A)), FrameError, 'unknown type');
  const oversize = blobFrame(A, Buffer.alloc(1));
  oversize.writeUInt32BE(MAX_BLOB_SIZE + 1, 33);
  assert.throws(bad(oversize), FrameError, 'length over the limit is refused before buffering it');
  const endWithBody = encodeFrame(FRAME_END, null, Buffer.alloc(1));
  assert.throws(bad(endWithBody), FrameError, 'end frame with a payload');
  assert.throws(bad(Buffer.concat([endFrame(), Buffer.alloc(3)])), FrameError, 'data after the end');
  assert.throws(bad(blobFrame(A, Buffer.alloc(10)).subarray(0, 20), true), /cut inside a frame/);
  assert.throws(bad(blobFrame(A, Buffer.alloc(10)), true), /without an end frame/);
  assert.throws(bad(encodeFrame(FRAME_PAGES, A, Buffer.alloc(3))), /pages frame without a tag/);
  // Type 3, the sender-named delta of the retired named push, is no frame any more.
  assert.throws(bad(encodeFrame(3, A, Buffer.alloc(40))), /unknown frame type 3/);
});

test('a reusing decoder hands out the same frames, each whole until the next push, whatever way the stream is cut', () => {
  const blobs = [randomBytes(70_000), randomBytes(5), randomBytes(200_000), randomBytes(1)];
  const wire = Buffer.concat([...blobs.map((b, i) => blobFrame(String(i).repeat(64), b)), errorFrame(A, 'gone'), endFrame()]);
  for (const step of [997, 4096, 65536, 100_000, wire.length]) {
    const d = new FrameDecoder({ reuse: true });
    const seen: { type: number; payload?: Buffer }[] = [];
    for (let i = 0; i < wire.length; i += step) {
      // Copied at once: a joined payload is valid until the next push only.
      for (const f of d.push(wire.subarray(i, i + step))) seen.push({ type: f.type, payload: 'payload' in f ? Buffer.from(f.payload) : undefined });
    }
    d.finish();
    assert.deepEqual(seen.map((f) => f.type), [FRAME_BLOB, FRAME_BLOB, FRAME_BLOB, FRAME_BLOB, FRAME_ERROR, FRAME_END], `step ${step}`);
    blobs.forEach((b, i) => assert.deepEqual(seen[i]!.payload, b, `blob ${i}, step ${step}`));
  }
});
