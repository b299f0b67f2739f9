import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import { test } from 'node:test';
import { BLOB_OVERHEAD, MAX_BLOB_SIZE, openBlob, sealChunk } from '../../src/core/chunks/blob.js';
import { computeChunkId, parseChunkId } from '../../src/core/chunk-id.js';
import { chunkCount, chunkLength, isZero, validateChunkSize } from '../../src/core/chunks/chunking.js';
import { BlobError, EnvelopeError, ManifestError } from '../../src/core/errors.js';
import { deriveDeviceUserKey, generateLineageKeys, unwrapLineageKeys, wrapLineageKeys } from '../../src/core/keys.js';
import { createManifest, decodeManifest, diffManifests, encodeManifest, manifestDigest, withChanges } from '../../src/core/chunks/manifest.js';

const keys = generateLineageKeys();

test('blob round trips: random, compressible, one-byte, short last chunk', () => {
  for (const data of [randomBytes(256 * 1024), Buffer.alloc(256 * 1024, 'abc'), Buffer.from([7]), randomBytes(12345)]) {
    const s = sealChunk(keys, data);
    assert.equal(s.id, computeChunkId(keys.idKey, data));
    assert.ok(openBlob(keys, s.id, s.blob).equals(data));
  }
  const text = sealChunk(keys, Buffer.alloc(256 * 1024, 'compressible '));
  assert.equal(text.compressed, true);
  assert.ok(text.blob.length < 4096);
  const noise = sealChunk(keys, randomBytes(256 * 1024));
  assert.equal(noise.compressed, false, 'stored raw when zstd does not shrink it');
  assert.equal(noise.blob.length, 256 * 1024 + BLOB_OVERHEAD);
});

test('every tamper case is rejected with a BlobError naming the chunk', () => {
  const data = Buffer.alloc(64 * 1024, 'payload ');
  const { id, blob } = sealChunk(keys, data);
  const flip = (at: number, mask = 0x01) => { const b = Buffer.from(blob); b[at]! ^= mask; return b; };
  const cases: [string, () => unknown, string][] = [
    ['version byte', () => openBlob(keys, id, flip(0)), 'version'],
    ['unknown flag bit', () => openBlob(keys, id, flip(1, 0x80)), 'flags'],
    ['nonce', () => openBlob(keys, id, flip(5)), 'auth'],
    ['body', () => openBlob(keys, id, flip(20)), 'auth'],
    ['tag', () => openBlob(keys, id, flip(blob.length - 1)), 'auth'],
    ['truncated', () => openBlob(keys, id, blob.subarray(0, 10)), 'truncated'],
    ['truncated body', () => openBlob(keys, id, blob.subarray(0, blob.length - 3)), 'auth'],
    ['oversize', () => openBlob(keys, id, Buffer.alloc(MAX_BLOB_SIZE + 1)), 'too-large'],
    ['wrong data key', () => openBlob({ ...keys, dataKey: randomBytes(32) }, id, blob), 'auth'],
    ['wrong ID', () => openBlob(keys, 'a'.repeat(64), blob), 'auth'],
    ['wrong ID key', () => openBlob({ ...keys, idKey: randomBytes(32) }, id, blob), 'id-mismatch'],
  ];
  for (const [name, fn, reason] of cases) {
    assert.throws(fn, (err: unknown) => err instanceof BlobError && err.reason === reason && err.message.includes(err.chunkId), name);
  }
  // The flags byte is authenticated: clearing "compressed" cannot make raw bytes pass.
  const b = Buffer.from(blob); b[1] = 0;
  assert.throws(() => openBlob(keys, id, b), (e: unknown) => e instanceof BlobError && e.reason === 'auth');
});

test('checkId: false skips only the HMAC re-check; GCM still rejects any change', () => {
  const data = randomBytes(4096);
  // A blob sealed under the wrong ID by a holder of the data key: only the HMAC re-check sees it.
  const mislabelled = sealChunk(keys, data, 'b'.repeat(64));
  assert.throws(() => openBlob(keys, 'b'.repeat(64), mislabelled.blob), (e: unknown) => e instanceof BlobError && e.reason === 'id-mismatch');
  assert.ok(openBlob(keys, 'b'.repeat(64), mislabelled.blob, { checkId: false }).equals(data));
  const { id, blob } = sealChunk(keys, data);
  const tampered = Buffer.from(blob);
  tampered[30]! ^= 1;
  assert.throws(() => openBlob(keys, id, tampered, { checkId: false }), (e: unknown) => e instanceof BlobError && e.reason === 'auth');
  assert.throws(() => openBlob(keys, 'c'.repeat(64), blob, { checkId: false }), (e: unknown) => e instanceof BlobError && e.reason === 'auth');
});

test('chunking: sizes, zero detection, last partial chunk', () => {
  for (const ok of [64 * 1024, 256 * 1024, 1 << 20, 4 << 20]) assert.equal(validateChunkSize(ok), ok);
  for (const bad of [0, 1000, 32 * 1024, 8 << 20, 300_000, 1.5]) assert.throws(() => validateChunkSize(bad), /power of two/);
  assert.equal(isZero(Buffer.alloc(5 << 20)), true);
  const almost = Buffer.alloc(5 << 20); almost[(5 << 20) - 1] = 1;
  assert.equal(isZero(almost), false);
  assert.equal(chunkCount(1000, 65536), 1);
  assert.equal(chunkLength(1, 65536 + 10, 65536), 10);
  assert.throws(() => chunkLength(2, 65536 + 10, 65536));
  assert.throws(() => parseChunkId('../../etc/passwd'));
});

test('manifest encode/decode, corruption detected, diff', () => {
  const ids = Array.from({ length: 5 }, () => computeChunkId(keys.idKey, randomBytes(16)));
  const m = createManifest(65536, 4 * 65536 + 100, [ids[0]!, null, ids[1]!, ids[0]!, null]);
  const enc = encodeManifest(m);
  assert.deepEqual(decodeManifest(enc), m);
  assert.equal(manifestDigest(decodeManifest(enc)), manifestDigest(m));
  assert.ok(enc.length < 4 * 32 + 100, 'holes cost a bit, not an ID');
  for (const bad of [enc.subarray(0, 20), enc.subarray(0, enc.length - 1), Buffer.concat([Buffer.from('XXXX'), enc.subarray(4)]), (() => { const b = Buffer.from(enc); b[40]! ^= 1; return b; })()]) {
    assert.throws(() => decodeManifest(bad), ManifestError);
  }
  assert.throws(() => createManifest(65536, 65536 * 3, [null]), /needs 3 entries/);
  // Well-formed checksums over bad bodies: IDs cut short, bytes after the last ID.
  const resealed = (body: Buffer) => Buffer.concat([body, createHash('sha256').update(body).digest()]);
  const body = enc.subarray(0, enc.length - 32);
  assert.throws(() => decodeManifest(resealed(body.subarray(0, body.length - 1))), /truncated/);
  assert.throws(() => decodeManifest(resealed(Buffer.concat([body, Buffer.alloc(1)]))), /trailing/);
  // Encoding checks each entry (a manifest made without createManifest): not hex, one digit short, not a string.
  for (const bad of ['g'.repeat(64), ids[0]!.slice(1), `${ids[0]!.slice(0, 63)}-`, 42]) {
    assert.throws(() => encodeManifest({ chunkSize: 65536, diskSize: 65536, chunks: [bad as string] }), /not a chunk ID/, String(bad));
  }
  const next = createManifest(65536, 6 * 65536, [ids[0]!, ids[2]!, ids[1]!, null, null, ids[3]!]);
  assert.deepEqual(diffManifests(m, next), [
    { index: 1, from: null, to: ids[2] },
    { index: 3, from: ids[0], to: null },
    { index: 5, from: null, to: ids[3] },
  ]);
  assert.throws(() => diffManifests(m, createManifest(131072, 0)), /chunk sizes/);
});

test('key wrapping binds key and context; device+password keys differ by either', async () => {
  const wrapping = randomBytes(32);
  const w = wrapLineageKeys(wrapping, keys, 'lineage:a');
  assert.deepEqual(unwrapLineageKeys(wrapping, w, 'lineage:a'), keys);
  assert.throws(() => unwrapLineageKeys(randomBytes(32), w, 'lineage:a'), EnvelopeError);
  assert.throws(() => unwrapLineageKeys(wrapping, w, 'lineage:b'), EnvelopeError);
  const params = { N: 1024, r: 8, p: 1 };
  const salt = randomBytes(16);
  const a = await deriveDeviceUserKey(Buffer.alloc(32, 1), 'pw', salt, params);
  assert.notDeepEqual(a, await deriveDeviceUserKey(Buffer.alloc(32, 2), 'pw', salt, params));
  assert.notDeepEqual(a, await deriveDeviceUserKey(Buffer.alloc(32, 1), 'pw2', salt, params));
  assert.deepEqual(a, await deriveDeviceUserKey(Buffer.alloc(32, 1), 'pw', salt, params));
});

test('a manifest with changes applied: the changed entries checked, the base untouched, the encoding as if made whole', () => {
  const ids = Array.from({ length: 8 }, () => randomBytes(32).toString('hex'));
  const base = createManifest(65536, 8 * 65536, ids.map((id, i) => (i % 3 ? id : null)));
  const next = withChanges(base, [[0, ids[0]!], [4, null], [7, ids[1]!]]);
  assert.deepEqual(next.chunks, [ids[0], ids[1], ids[2], null, null, ids[5], null, ids[1]]);
  assert.deepEqual(base.chunks, ids.map((id, i) => (i % 3 ? id : null)), 'the base is not changed');
  assert.ok(encodeManifest(next).equals(encodeManifest(createManifest(65536, 8 * 65536, next.chunks))));
  assert.throws(() => withChanges(base, [[8, ids[0]!]]), /outside a manifest of 8/);
  assert.throws(() => withChanges(base, [[-1, null]]), /outside/);
  assert.throws(() => withChanges(base, [[1, 'A'.repeat(64)]]), /not a chunk ID/);
});
