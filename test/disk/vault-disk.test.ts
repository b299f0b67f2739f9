import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, test } from 'node:test';
import { DiskError } from '../../src/disk/block-device.js';
import { VaultDisk, type VaultDiskOptions } from '../../src/disk/vault-disk.js';
import { PackChunkStore } from '../../src/store/pack-chunk-store.js';
import { importRaw, makeImage } from './fixtures.js';

const CS = 64 * 1024;
const dirs: string[] = [];
after(() => dirs.forEach((d) => rmSync(d, { recursive: true, force: true })));
function tmp(): string {
  const d = mkdtempSync(join(tmpdir(), 'carryon-vd-'));
  dirs.push(d);
  return d;
}

async function setup(size = 10 * CS + 1000) {
  const root = tmp();
  const store = await PackChunkStore.open(join(root, 'store'));
  const img = makeImage(size, CS);
  const { keys, manifest } = await importRaw(store, img, CS);
  const opts: VaultDiskOptions = { stateDir: join(root, 'state'), store, keys, base: manifest, autoFlushMs: 0 };
  return { root, store, img, keys, manifest, opts };
}

test('reads the base image exactly, including holes and a short last chunk', async () => {
  const { img, opts } = await setup();
  const disk = await VaultDisk.open(opts);
  assert.deepEqual(await disk.read(0, img.length), img);
  assert.deepEqual(await disk.read(CS - 10, 30), img.subarray(CS - 10, CS + 20));
  assert.deepEqual(await disk.read(img.length - 5, 5), img.subarray(img.length - 5));
  await assert.rejects(disk.read(img.length - 5, 6), (e: unknown) => e instanceof DiskError && e.reason === 'range');
  assert.equal(await disk.percentLocal(), 100);
  await disk.close();
});

test('writes are copy-on-write, flushed state survives a crash, unflushed writes do not', async () => {
  const { img, opts, manifest } = await setup();
  const disk = await VaultDisk.open(opts);
  const a = randomBytes(100);
  await disk.write(CS - 50, a); // spans chunks 0 and 1 (1 was a hole)
  a.copy(img, CS - 50);
  assert.deepEqual(await disk.read(0, img.length), img);
  assert.deepEqual(disk.dirtyIndexes(), [0, 1]);
  await disk.flush();
  const flushed = Buffer.from(img);
  await disk.write(5 * CS, randomBytes(10)); // never flushed
  // "Crash": open a second instance on the same state without closing the first.
  const again = await VaultDisk.open(opts);
  assert.deepEqual(await again.read(0, flushed.length), flushed);
  assert.deepEqual(again.dirtyIndexes(), [0, 1]);
  assert.notEqual(again.currentManifest().chunks[0], manifest.chunks[0]);
  assert.equal(again.dirtyBytes(), 2 * CS);
  await again.close();
});

test('FUA write is durable without flush; an all-zero chunk becomes a hole', async () => {
  const { img, opts } = await setup();
  const disk = await VaultDisk.open(opts);
  await disk.write(2 * CS, Buffer.alloc(CS), true);
  const again = await VaultDisk.open(opts);
  assert.equal(again.currentManifest().chunks[2], null);
  img.fill(0, 2 * CS, 3 * CS);
  assert.deepEqual(await again.read(0, img.length), img);
  await again.close();
  await disk.close();
});

test('trim and write-zeroes: whole chunks become holes, partial ranges read as zeros', async () => {
  const { img, opts } = await setup();
  const disk = await VaultDisk.open(opts);
  await disk.trim(3 * CS, CS);
  await disk.writeZeroes(5 * CS + 10, CS + 20);
  await disk.flush();
  img.fill(0, 3 * CS, 4 * CS);
  img.fill(0, 5 * CS + 10, 6 * CS + 30);
  assert.deepEqual(await disk.read(0, img.length), img);
  const m = disk.currentManifest();
  assert.equal(m.chunks[3], null);
  assert.notEqual(m.chunks[5], null);
  await disk.close();
});

test('missing chunk: fetchChunk fills it, without it a clear I/O error', async () => {
  const { root, img, opts, store } = await setup();
  const local = await PackChunkStore.open(join(root, 'partial'));
  const first = opts.base.chunks.find((c) => c !== null)!;
  await local.put(first, (await store.get(first))!);
  const noFetch = await VaultDisk.open({ ...opts, store: local, stateDir: join(root, 's1') });
  assert.ok((await noFetch.percentLocal()) < 100);
  await assert.rejects(noFetch.read(0, img.length), (e: unknown) => e instanceof DiskError && e.reason === 'io');
  const fetched: number[] = [];
  const streaming = await VaultDisk.open({
    ...opts,
    store: local,
    stateDir: join(root, 's2'),
    fetchChunk: async (id, index) => {
      fetched.push(index);
      await local.put(id, (await store.get(id))!);
    },
  });
  assert.deepEqual(await streaming.read(0, img.length), img);
  assert.ok(fetched.length > 0);
  assert.equal(await streaming.percentLocal(), 100);
  assert.deepEqual(await streaming.missingChunks(), []);
  await streaming.close();
  await noFetch.close();
});

test('sequential reads fetch the next chunks ahead; random reads do not', async () => {
  const { root, opts, store } = await setup(40 * CS);
  const local = await PackChunkStore.open(join(root, 'partial'));
  const fetched = new Set<number>();
  const disk = await VaultDisk.open({
    ...opts, store: local, stateDir: join(root, 'ra'), readAheadChunks: 4,
    fetchChunk: async (id, index) => {
      fetched.add(index);
      await local.put(id, (await store.get(id))!);
    },
  });
  const dataChunks = (from: number, to: number) => [...Array(to - from).keys()].map((i) => from + i).filter((i) => opts.base.chunks[i] !== null);
  await disk.read(20 * CS, 4096); // random: only chunk 20
  await new Promise((r) => setTimeout(r, 50));
  assert.deepEqual([...fetched].sort((a, b) => a - b), dataChunks(20, 21));
  fetched.clear();
  await disk.read(0, CS);
  await disk.read(CS, CS); // sequential from here: chunks 2..5 come ahead of the reads
  for (let i = 0; i < 100 && dataChunks(2, 6).some((c) => !fetched.has(c)); i++) await new Promise((r) => setTimeout(r, 10));
  assert.deepEqual([...fetched].sort((a, b) => a - b), dataChunks(0, 6));
  await disk.close();
});

test('state of another base is refused; rebase and discard', async () => {
  const { img, opts } = await setup();
  const disk = await VaultDisk.open(opts);
  await disk.write(0, Buffer.from('hello'));
  await disk.flush();
  const next = disk.currentManifest();
  await disk.rebase(next);
  assert.deepEqual(disk.dirtyIndexes(), []);
  await assert.rejects(VaultDisk.open(opts), (e: unknown) => e instanceof DiskError && e.reason === 'state');
  await disk.write(CS, Buffer.from('world'));
  await disk.discard();
  assert.deepEqual(disk.dirtyIndexes(), []);
  Buffer.from('hello').copy(img, 0);
  assert.deepEqual(await disk.read(0, img.length), img);
  await disk.close();
  const reopened = await VaultDisk.open({ ...opts, base: next });
  assert.deepEqual(await reopened.read(0, img.length), img);
  await reopened.close();
});

test('concurrent overlapping writes and reads stay consistent per chunk', async () => {
  const { img, opts } = await setup();
  const disk = await VaultDisk.open({ ...opts, maxDirtyBytes: 2 * CS });
  const ops: Promise<unknown>[] = [];
  for (let i = 0; i < 200; i++) {
    const off = (i * 7919) % (img.length - 300);
    const data = randomBytes(1 + ((i * 131) % 300));
    data.copy(img, off); // applied in issue order; writes to the same chunk serialise in that order
    ops.push(disk.write(off, data));
  }
  await Promise.all(ops);
  assert.deepEqual(await disk.read(0, img.length), img);
  await disk.close();
  const again = await VaultDisk.open(opts);
  assert.deepEqual(await again.read(0, img.length), img);
  await again.close();
});

test('worker-thread crypto: same bytes as in-thread, tampered blob is a clear error', async () => {
  const { img, opts, store, root } = await setup();
  const disk = await VaultDisk.open({ ...opts, cryptoWorkers: 2 });
  assert.deepEqual(await disk.read(0, img.length), img);
  const data = randomBytes(3 * CS);
  await disk.write(CS / 2, data);
  await disk.flush();
  data.copy(img, CS / 2);
  const again = await VaultDisk.open({ ...opts, cryptoWorkers: 0 });
  assert.deepEqual(await again.read(0, img.length), img);
  await again.close();
  await disk.close();
  // A blob altered at rest is refused by the worker, never returned as data.
  const victim = opts.base.chunks[0]!;
  const bad = Buffer.from((await store.get(victim))!);
  bad[bad.length - 1]! ^= 1;
  const evil = await PackChunkStore.open(join(root, 'evil'));
  await evil.put(victim, bad);
  const tampered = await VaultDisk.open({ ...opts, store: evil, stateDir: join(root, 's-evil'), cryptoWorkers: 1 });
  await assert.rejects(tampered.read(0, 10), /blob rejected \(auth\)/);
  await tampered.close();
});

test('writes are sealed and recorded by the timer without an explicit flush', async () => {
  const { img, opts } = await setup();
  const disk = await VaultDisk.open({ ...opts, autoFlushMs: 20 });
  await disk.write(7 * CS + 3, Buffer.from('timer'));
  Buffer.from('timer').copy(img, 7 * CS + 3);
  let seen = false;
  for (let i = 0; i < 200 && !seen; i++) {
    await new Promise((r) => setTimeout(r, 20));
    // A second instance sees only what the first persisted (as after a crash).
    const probe = await VaultDisk.open({ ...opts, stateDir: opts.stateDir });
    seen = probe.dirtyIndexes().includes(7);
    if (seen) assert.deepEqual(await probe.read(0, img.length), img);
    await probe.close();
  }
  assert.ok(seen, 'the auto-flush persisted the write');
  await disk.close();
});

test('a read-only disk refuses writes, trims and zeroes with a typed error', async () => {
  const { opts, img } = await setup();
  const disk = await VaultDisk.open({ ...opts, readOnly: true });
  const ro = (e: unknown) => e instanceof DiskError && e.reason === 'read-only';
  await assert.rejects(disk.write(0, Buffer.from('x')), ro);
  await assert.rejects(disk.trim(0, CS), ro);
  await assert.rejects(disk.writeZeroes(0, CS), ro);
  assert.deepEqual(await disk.read(0, img.length), img);
  await disk.close();
});
