import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import { test } from 'node:test';
import { diffuseSha256, sha256Short, SHA256_SHORT_MAX } from '../../src/disk/sha256-short.js';
import { afChainSha256, afSha256Memory } from '../../src/disk/af-sha256-wasm.js';
import { afChainJs } from '../../src/disk/luks-header.js';

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

test('the WebAssembly anti-forensic chain equals the JavaScript one (the SHA-256 diffuse over XORed stripes), and leaves no key material in its memory', () => {
  for (const stripes of [1, 2, 3, 17, 4000]) {
    const material = randomBytes(64 * stripes + 32);
    const fast = afChainSha256(material, stripes);
    assert.ok(fast, 'WebAssembly is there in every Node this project supports');
    assert.ok(fast.equals(afChainJs(material, 64, stripes, 'sha256')), `${stripes} stripes`);
  }
  assert.throws(() => afChainSha256(Buffer.alloc(64 * 3 - 1), 3), RangeError);
  const secret = randomBytes(64 * 50);
  afChainSha256(secret, 50);
  const mem = Buffer.from(afSha256Memory()!.buffer);
  for (let at = 0; at + 16 <= secret.length; at += 64) assert.equal(mem.indexOf(secret.subarray(at, at + 16)), -1, `stripe ${at / 64} left in memory`);
});
