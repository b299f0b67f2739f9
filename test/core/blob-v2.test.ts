import assert from 'node:assert/strict';
import { createCipheriv, createDecipheriv, hkdfSync, randomBytes } from 'node:crypto';
import { test } from 'node:test';
import { BLOB_OVERHEAD, BLOB_VERSION, openBlob, sealChunk } from '../../src/core/chunks/blob.js';
import { chunkIdToBytes, computeChunkId } from '../../src/core/chunk-id.js';
import { openPages, sealPages } from '../../src/core/chunks/delta.js';
import { BlobError } from '../../src/core/errors.js';
import { decodeLineageKeys, encodeLineageKeys, generateLineageKeys, rotateDataKey, unwrapLineageKeys, wrapLineageKeys, type LineageKeys } from '../../src/core/keys.js';

/** A version 1 blob exactly as earlier releases sealed it: random 96-bit nonce under the data key itself. */
function sealV1(keys: LineageKeys, plaintext: Buffer): { id: string; blob: Buffer } {
  const id = computeChunkId(keys.idKey, plaintext);
  const header = Buffer.from([1, 0]);
  const nonce = randomBytes(12);
  const c = createCipheriv('aes-256-gcm', keys.dataKey, nonce);
  c.setAAD(Buffer.concat([header, chunkIdToBytes(id)]));
  const body = Buffer.concat([c.update(plaintext), c.final()]);
  return { id, blob: Buffer.concat([header, nonce, body, c.getAuthTag()]) };
}

test('version 2: a fresh 192-bit salt (so a fresh subkey) per blob, the key generation in the header', () => {
  const keys = generateLineageKeys();
  const data = randomBytes(64 * 1024);
  const a = sealChunk(keys, data);
  const b = sealChunk(keys, data);
  assert.equal(a.blob[0], BLOB_VERSION);
  assert.equal(BLOB_VERSION, 2);
  assert.equal(a.blob.readUInt32BE(2), 0);
  assert.notDeepEqual(a.blob.subarray(6, 30), b.blob.subarray(6, 30), 'salts differ');
  assert.notDeepEqual(a.blob.subarray(30, 62), b.blob.subarray(30, 62), 'so do the key streams: the same chunk sealed twice never repeats a (key, nonce) pair');
  assert.equal(a.blob.length, data.length + BLOB_OVERHEAD);
  assert.deepEqual(openBlob(keys, a.id, a.blob), data);
  for (const at of [2, 5, 6, 29]) {
    const bad = Buffer.from(a.blob);
    bad[at]! ^= 1;
    assert.throws(() => openBlob(keys, a.id, bad), BlobError, `byte ${at} of the header is authenticated`);
  }
});

test('the subkey is HKDF-SHA256 of the data key with the blob\'s salt (what hkdfSync derives): the blob opens with it by hand', () => {
  const keys = generateLineageKeys();
  for (const data of [randomBytes(1000), Buffer.alloc(300 * 1024, 7)]) {
    const { id, blob } = sealChunk(keys, data);
    const header = blob.subarray(0, 30);
    const key = Buffer.from(hkdfSync('sha256', keys.dataKey, header.subarray(6), 'carryon-blob:v2', 32));
    const d = createDecipheriv('aes-256-gcm', key, Buffer.alloc(12));
    d.setAAD(Buffer.concat([header, chunkIdToBytes(id)]));
    d.setAuthTag(blob.subarray(blob.length - 16));
    const body = Buffer.concat([d.update(blob.subarray(30, blob.length - 16)), d.final()]);
    // Compressed or not (flag bit 0): what came out of GCM is the plaintext or its zstd frame.
    if (!(blob[1]! & 1)) assert.deepEqual(body, data);
    else assert.ok(body.length < data.length);
  }
});

test('version 1 blobs stay readable', () => {
  const keys = generateLineageKeys();
  const data = randomBytes(10_000);
  const v1 = sealV1(keys, data);
  assert.deepEqual(openBlob(keys, v1.id, v1.blob), data);
  assert.deepEqual(openBlob(rotateDataKey(keys), v1.id, v1.blob), data, 'after a rotation too');
});

test('rotation: new blobs under the new generation, old ones still open; a holder without the new key refuses clearly', () => {
  const gen0 = generateLineageKeys();
  const gen1 = rotateDataKey(gen0);
  const gen2 = rotateDataKey(gen1);
  assert.equal(gen2.dataKeyId, 2);
  assert.ok(gen2.idKey.equals(gen0.idKey), 'chunk IDs (and dedup) survive rotation');
  const data = randomBytes(5000);
  const old = sealChunk(gen0, data);
  const fresh = sealChunk(gen2, data);
  assert.equal(old.id, fresh.id);
  assert.equal(fresh.blob.readUInt32BE(2), 2);
  assert.deepEqual(openBlob(gen2, old.id, old.blob), data);
  assert.throws(() => openBlob(gen0, fresh.id, fresh.blob), /generation 2, which this holder does not have/);
  const base = randomBytes(256 * 1024);
  const next = Buffer.from(base);
  next.write('changed', 4096);
  const pages = sealPages(gen2, computeChunkId(gen2.idKey, base), next.length, [{ offset: 4096, bytes: next.subarray(4096, 8192) }]);
  assert.deepEqual(openPages(gen2, computeChunkId(gen2.idKey, base), pages, base, 'rotated'), next);

  // Encodings: an unrotated lineage keeps the 64-byte form; a rotated one keeps every generation.
  assert.equal(Buffer.from(encodeLineageKeys(gen0), 'base64').length, 64);
  const back = decodeLineageKeys(encodeLineageKeys(gen2));
  assert.equal(back.dataKeyId, 2);
  assert.deepEqual(openBlob(back, old.id, old.blob), data);
  const master = randomBytes(32);
  const unwrapped = unwrapLineageKeys(master, wrapLineageKeys(master, gen2, 'lineage:x'), 'lineage:x');
  assert.deepEqual(openBlob(unwrapped, fresh.id, fresh.blob), data);
  assert.deepEqual([...unwrapped.olderDataKeys!.keys()], [0, 1]);
});

test('opening into a recycled buffer: the same plaintext, compressed or not; a tampered blob still refused; too small a buffer is not used', () => {
  const keys = generateLineageKeys();
  const text = Buffer.alloc(256 * 1024, 'the laptop is offline; ');
  for (const data of [randomBytes(256 * 1024), text, randomBytes(100)]) {
    const { id, blob } = sealChunk(keys, data);
    const into = Buffer.alloc(256 * 1024, 0xee);
    const plain = openBlob(keys, id, blob, { into });
    assert.deepEqual(plain, data);
    assert.equal(plain.buffer, into.buffer, 'a view of the buffer given');
    assert.deepEqual(openBlob(keys, id, blob, { into: Buffer.alloc(10) }), data);
    for (const at of [40, blob.length - 1]) {
      const bad = Buffer.from(blob);
      bad[at]! ^= 1;
      assert.throws(() => openBlob(keys, id, bad, { into: Buffer.alloc(256 * 1024) }), BlobError, `byte ${at}`);
    }
  }
});
