import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import { test } from 'node:test';
import { diffuseSha256, sha256Short, SHA256_SHORT_MAX } from '../../src/disk/sha256-short.js';

test('sha256Short equals Node\'s SHA-256 for every length it takes, and refuses longer messages', () => {
  for (let len = 0; len <= SHA256_SHORT_MAX; len++) {
    for (let round = 0; round < 20; round++) {
      const msg = randomBytes(len + 3); // longer than len: only the first len bytes count
      const out = Buffer.alloc(40, 0xaa);
      sha256Short(msg, len, out, 5);
      assert.ok(out.subarray(5, 37).equals(createHash('sha256').update(msg.subarray(0, len)).digest()), `length ${len}`);
      assert.equal(out[4], 0xaa);
      assert.equal(out[37], 0xaa);
    }
  }
  assert.throws(() => sha256Short(Buffer.alloc(64), SHA256_SHORT_MAX + 1, Buffer.alloc(32)), RangeError);
  assert.throws(() => sha256Short(Buffer.alloc(8), 8, Buffer.alloc(31)), RangeError);
});

test('diffuseSha256 is LUKS1\'s diffuse: each 32-byte piece hashed behind its big-endian index', () => {
  for (const size of [64, 32, 40, 5, 96]) {
    const block = randomBytes(size);
    const out = Buffer.alloc(size);
    diffuseSha256(block, out);
    const want = Buffer.alloc(size);
    for (let i = 0, at = 0; at < size; i++, at += 32) {
      const index = Buffer.alloc(4);
      index.writeUInt32BE(i);
      createHash('sha256').update(index).update(block.subarray(at, Math.min(size, at + 32))).digest().copy(want, at, 0, Math.min(32, size - at));
    }
    assert.ok(out.equals(want), `${size}-byte block`);
  }
});
