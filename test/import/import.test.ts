import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdtempSync, readFileSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, test } from 'node:test';
import { generateLineageKeys } from '../../src/core/keys.js';
import { decodeManifest } from '../../src/core/chunks/manifest.js';
import { exportImage } from '../../src/import/export.js';
import { importImage } from '../../src/import/import.js';
import { PackChunkStore } from '../../src/store/pack-chunk-store.js';

const dir = mkdtempSync(join(tmpdir(), 'carryon-import-'));
after(() => rmSync(dir, { recursive: true, force: true }));
const keys = generateLineageKeys();

async function countBlobs(store: PackChunkStore): Promise<number> {
  let n = 0;
  for await (const _ of store.list()) n++;
  return n;
}

test('qcow2 made by qemu-img + qemu-io re-assembles equal to qemu-img convert -O raw', async () => {
  const img = join(dir, 'disk.qcow2');
  execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', img, '24M']);
  execFileSync('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0xab 0 1M', '-c', 'write -P 0x11 5M 300k', '-c', 'write -P 0x7f 23M 999k', img]);
  const store = await PackChunkStore.open(join(dir, 'store1'));
  const res = await importImage(img, { store, keys });
  assert.equal(res.manifest.diskSize, 24 * 1024 * 1024);
  assert.ok(res.holes > 0, 'unwritten regions are holes');
  assert.equal(res.chunksDeduped > 0, true, 'repeated 0xab chunks dedup within the image');
  const stored = await store.getManifest(res.digest);
  assert.deepEqual(decodeManifest(stored!), res.manifest);

  const expected = join(dir, 'expected.raw');
  execFileSync('qemu-img', ['convert', '-O', 'raw', img, expected]);
  const out = join(dir, 'out.raw');
  await exportImage(res.manifest, { store, keys }, out);
  assert.ok(readFileSync(out).equals(readFileSync(expected)));

  const out2 = join(dir, 'out.qcow2');
  await exportImage(res.manifest, { store, keys }, out2, { format: 'qcow2' });
  execFileSync('qemu-img', ['compare', '-q', out2, expected]);
});

test('raw image with holes and an unaligned size; second import dedups everything', async () => {
  const img = join(dir, 'odd.raw');
  const size = 3 * 256 * 1024 + 12345;
  const data = Buffer.alloc(size);
  randomBytes(100_000).copy(data, 10);
  randomBytes(12345).copy(data, size - 12345);
  writeFileSync(img, data);
  const store = await PackChunkStore.open(join(dir, 'store2'));
  const first = await importImage(img, { store, keys, workers: 2 });
  assert.equal(first.manifest.chunks.length, 4);
  assert.equal(first.holes, 2);
  assert.equal(first.chunksStored, 2);
  const second = await importImage(img, { store, keys });
  assert.equal(second.chunksStored, 0);
  assert.equal(second.chunksDeduped, 2);
  assert.equal(second.digest, first.digest);
  const out = join(dir, 'odd.out');
  await exportImage(second.manifest, { store, keys }, out);
  assert.ok(readFileSync(out).equals(data));
});

test('bad input: missing path, bad chunk size, unsupported format leave nothing in the store', async () => {
  const store = await PackChunkStore.open(join(dir, 'store3'));
  await assert.rejects(importImage(join(dir, 'nope.img'), { store, keys }), { code: 'not-found' });
  const img = join(dir, 'small.raw');
  writeFileSync(img, randomBytes(300_000));
  await assert.rejects(importImage(img, { store, keys, chunkSize: 100_000 }), /not a power of two/);
  await assert.rejects(importImage(img, { store, keys, format: 'iso' as never }), /not supported/);
  const truncated = join(dir, 'trunc.qcow2');
  execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', truncated, '8M']);
  writeFileSync(truncated, readFileSync(truncated).subarray(0, 100));
  await assert.rejects(importImage(truncated, { store, keys }));
  // Cut inside the data: QEMU alone would read the lost clusters as zeros; the check refuses it.
  const cut = join(dir, 'cut.qcow2');
  execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', cut, '16M']);
  execFileSync('qemu-io', ['-f', 'qcow2', '-c', 'write -P 9 0 4M', cut]);
  writeFileSync(cut, readFileSync(cut).subarray(0, 400_000));
  await assert.rejects(importImage(cut, { store, keys }), /fails qemu-img check/);
  assert.equal(await countBlobs(store), 0);
  assert.deepEqual(readdirSync(join(dir, 'store3', 'tmp')), []);
});
