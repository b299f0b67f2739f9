import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { createCipheriv, randomBytes, randomFillSync } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync, statSync, truncateSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, test } from 'node:test';
import { DiskError } from '../../src/disk/block-device.js';
import { createLayerFromTemplate, createWithQemu } from '../../src/disk/layer-template.js';
import { SECRET_FD_OBJECT } from '../../src/qemu/qemu-tools.js';
import { Qcow2BaseWriter } from '../../src/disk/qcow2/qcow2-base-writer.js';
import { UnsupportedImage } from '../../src/disk/qcow2/qcow2-format.js';
import { XtsSectors } from '../../src/disk/qcow2/xts.js';

const dir = mkdtempSync(join(tmpdir(), 'carryon-qbw-'));
// Writers hold threads: a test that fails half-way must not keep the process alive.
const opened: Qcow2BaseWriter[] = [];
async function openWriter(path: string, pass: string, chunk: number, directIo = true): Promise<Qcow2BaseWriter> {
  const w = await Qcow2BaseWriter.open(path, pass, chunk, { directIo });
  opened.push(w);
  return w;
}
after(async () => {
  await Promise.all(opened.map((w) => w.close().catch(() => undefined)));
  rmSync(dir, { recursive: true, force: true });
});
const templates = process.env.CARRYON_TEMPLATE_DIR ?? join(dir, 'templates');
const PASS = randomBytes(32).toString('base64');

/** OpenSSL's aes-256-xts, one cipher object per 512-byte sector: the reference. */
function referenceXts(key: Buffer, data: Buffer, first: number): Buffer {
  const out = Buffer.alloc(data.length);
  for (let s = 0; s * 512 < data.length; s++) {
    const iv = Buffer.alloc(16);
    iv.writeBigUInt64LE(BigInt(first + s));
    const c = createCipheriv('aes-256-xts', key, iv);
    c.update(data.subarray(s * 512, (s + 1) * 512)).copy(out, s * 512);
    c.final();
  }
  return out;
}

test('XtsSectors is byte for byte OpenSSL aes-256-xts with plain64 IVs, also past 2^32 sectors and from an unaligned view', () => {
  const key = randomBytes(64);
  const xts = new XtsSectors(key);
  const data = randomBytes(64 * 1024 + 1).subarray(1); // byteOffset 1: not word-aligned
  for (const first of [0, 1, 123_456_789, 2 ** 32 - 3, 2 ** 40 + 7]) assert.ok(Buffer.from(xts.encryptView(data, first)).equals(referenceXts(key, data, first)), `sector ${first}`);
  // The view into the object's own memory: valid until the next call, which may need more room.
  const small = xts.encryptView(data.subarray(0, 1024), 9);
  assert.ok(Buffer.from(small).equals(referenceXts(key, data.subarray(0, 1024), 9)));
  const big = randomBytes(1024 * 1024 + 512);
  assert.ok(Buffer.from(xts.encryptView(big, 5)).equals(referenceXts(key, big, 5)));
  assert.ok(Buffer.from(xts.encryptView(data, 3)).equals(referenceXts(key, data, 3)));
  assert.throws(() => xts.encryptView(data.subarray(0, 1000), 0), /whole number of sectors/);
  assert.throws(() => new XtsSectors(randomBytes(32)), /64-byte key/);
});

const CHUNK = 256 * 1024;

async function base(name: string, size: number): Promise<string> {
  const path = join(dir, name);
  await createLayerFromTemplate(templates, { kind: 'base', clusterSize: CHUNK }, path, size, PASS);
  return path;
}

/** What QEMU reads from the base (its own LUKS and qcow2 code), and what `qemu-img check` says. */
function qemuRead(path: string): { data: Buffer; check: number } {
  const json = `json:${JSON.stringify({ driver: 'qcow2', file: { driver: 'file', filename: path }, encrypt: { format: 'luks', 'key-secret': 's' } })}`;
  const out = join(dir, 'out.raw');
  const conv = spawnSync('qemu-img', ['convert', '--object', `secret,id=s,data=${PASS}`, '-O', 'raw', json, out], { encoding: 'utf8' });
  assert.equal(conv.status, 0, conv.stderr);
  const check = spawnSync('qemu-img', ['check', '--object', `secret,id=s,data=${PASS}`, json], { encoding: 'utf8' });
  const data = readFileSync(out);
  rmSync(out);
  return { data, check: check.status ?? -1 };
}

/** Writes chunks in two runs (one rewritten in place) and reads the disk back through QEMU. */
async function writeAndReadBack(name: string, directIo: boolean) {
  const size = 40 * CHUNK + 100 * 1024;
  const path = await base(name, size);
  const want = Buffer.alloc(size);
  const w = await openWriter(path, PASS, CHUNK, directIo);
  const put = async (writer: Qcow2BaseWriter, index: number) => {
    const plain = randomBytes(Math.min(CHUNK, size - index * CHUNK));
    plain.copy(want, index * CHUNK);
    await writer.write(index, plain);
  };
  await Promise.all([3, 0, 17, 40, 39].map((i) => put(w, i)));
  assert.deepEqual((await w.persist()).sort((a, b) => a - b), [0, 3, 17, 39, 40]);
  await w.close();
  let seen = qemuRead(path);
  assert.equal(seen.check, 0);
  assert.ok(seen.data.equals(want));

  // A later run: new chunks, and one already mapped rewritten in place.
  const again = await openWriter(path, PASS, CHUNK, directIo);
  await put(again, 17);
  // A finished write hands its buffer back: the next chunk's plaintext may be written into it, old bytes and all.
  const spare = again.spare();
  assert.equal(spare?.length, CHUNK);
  randomFillSync(spare!);
  spare!.copy(want, 5 * CHUNK);
  await Promise.all([again.write(5, spare!), put(again, 20)]);
  await again.persist();
  await again.close();
  seen = qemuRead(path);
  assert.equal(seen.check, 0);
  assert.ok(seen.data.equals(want));
}

test('chunks written by the Node writer (direct I/O) read back through QEMU exactly, short last chunk included; qemu-img check is clean', async () => {
  await writeAndReadBack('a.qcow2', true);
});

test('through the page cache (a file system that refuses O_DIRECT) the same chunks read back exactly', async () => {
  await writeAndReadBack('a-cached.qcow2', false);
});

test('plaintext slots: while every slot is lent out writes still go through (copied or transferred), a slot given back is lent again, a short last chunk may be a slot\'s prefix; QEMU reads it all back', async () => {
  const chunks = 72;
  const size = chunks * CHUNK + 100 * 1024;
  const path = await base('slots.qcow2', size);
  const w = await openWriter(path, PASS, CHUNK);
  const want = Buffer.alloc(size);
  const lent: Buffer[] = [];
  // Slots are made as they are needed: the first one lent and written is the next one lent (its pages touched already).
  const first = w.spare()!;
  const slotMemory = first.buffer;
  randomFillSync(first);
  await w.write(0, first);
  const next = w.spare()!;
  assert.equal(next.buffer, slotMemory, 'the slot freed last is lent first');
  lent.push(next);
  for (let b = w.spare(); b; b = w.spare()) lent.push(b);
  assert.ok(lent.length >= 8 && lent.length < chunks, `${lent.length} slots`);
  assert.equal(new Set(lent.map((b) => b.buffer)).size, lent.length, 'no slot lent twice');
  // Nothing free: a buffer of the caller's own is transferred, as before slots.
  const own = randomBytes(CHUNK);
  own.copy(want, 0);
  await w.write(0, own);
  // A slot given back (its chunk failed authentication) is the next one lent, old bytes and all.
  const back = lent.pop()!;
  w.giveBack(back);
  const again = w.spare();
  assert.equal(again?.buffer, back.buffer);
  lent.push(again!);
  assert.equal(w.spare(), null);
  const writes: Promise<void>[] = [];
  lent.forEach((slot, i) => {
    randomFillSync(slot);
    slot.copy(want, (i + 1) * CHUNK);
    writes.push(w.write(i + 1, slot));
  });
  await Promise.all(writes);
  // Slots free again: a caller's buffer is copied into one; the short last chunk is a prefix of a lent slot.
  const copied = randomBytes(CHUNK);
  copied.copy(want, (chunks - 1) * CHUNK);
  await w.write(chunks - 1, copied);
  const last = w.spare()!.subarray(0, 100 * 1024);
  randomFillSync(last);
  last.copy(want, chunks * CHUNK);
  await w.write(chunks, last);
  await w.persist();
  await w.close();
  const seen = qemuRead(path);
  assert.equal(seen.check, 0);
  assert.ok(seen.data.equals(want));
});

test('a kill before persist maps nothing (chunks read as holes); one between the refcount and L2 steps only leaks clusters', async () => {
  const path = await base('b.qcow2', 8 * CHUNK);
  const w = await openWriter(path, PASS, CHUNK);
  await w.write(2, randomBytes(CHUNK));
  await w.close(); // no persist: as if killed
  let seen = qemuRead(path);
  assert.equal(seen.check, 0);
  assert.ok(seen.data.equals(Buffer.alloc(8 * CHUNK)));

  // Refcounts made durable, the mapping never written: QEMU's check calls it leaked (exit 3), not corrupt.
  const sizeBefore = statSync(path).size;
  const w2 = await openWriter(path, PASS, CHUNK);
  await w2.write(4, randomBytes(CHUNK));
  const persistRefcountsOnly = w2 as unknown as { ready: Map<number, number> };
  const ready = new Map(persistRefcountsOnly.ready);
  persistRefcountsOnly.ready.clear();
  await w2.persist();
  await w2.close();
  assert.equal(ready.size, 1);
  seen = qemuRead(path);
  assert.equal(seen.check, 3, 'leaked clusters only');
  assert.ok(seen.data.equals(Buffer.alloc(8 * CHUNK)));

  // A disk that filled up: the cluster was counted but its data never reached the file. The next
  // run must allocate past it, not take it again.
  truncateSync(path, sizeBefore);
  const w3 = await openWriter(path, PASS, CHUNK);
  const plain = randomBytes(CHUNK);
  const want = Buffer.alloc(8 * CHUNK);
  plain.copy(want, 5 * CHUNK);
  await w3.write(5, plain);
  await w3.persist();
  await w3.close();
  seen = qemuRead(path);
  assert.equal(seen.check, 3, 'leaked clusters only');
  assert.ok(seen.data.equals(want));
});

test('a file past the first refcount block gets a new block that counts itself; QEMU agrees', async () => {
  const path = await base('c.qcow2', 8 * CHUNK);
  // 16-bit refcounts: one block covers CHUNK / 2 clusters. Grow the file (sparse) to just short of that.
  truncateSync(path, (CHUNK / 2 - 1) * CHUNK);
  const w = await openWriter(path, PASS, CHUNK);
  const want = Buffer.alloc(8 * CHUNK);
  for (const i of [1, 6]) {
    const plain = randomBytes(CHUNK);
    plain.copy(want, i * CHUNK);
    await w.write(i, plain);
  }
  await w.persist();
  await w.close();
  const seen = qemuRead(path);
  assert.equal(seen.check, 0);
  assert.ok(seen.data.equals(want));
});

test('images the writer does not take are refused as unsupported; a wrong passphrase is an error, not garbage', async () => {
  const path = await base('d.qcow2', 4 * CHUNK);
  await assert.rejects(openWriter(path, PASS, 64 * 1024), (e: unknown) => e instanceof UnsupportedImage && /cluster size/.test((e as Error).message));
  await assert.rejects(openWriter(path, 'not-the-pass', CHUNK), (e: unknown) => e instanceof DiskError && !(e instanceof UnsupportedImage) && /passphrase/.test((e as Error).message));
  const top = join(dir, 'top.qcow2');
  await createLayerFromTemplate(templates, { kind: 'top', clusterSize: 128 * 1024 }, top, 4 * CHUNK, PASS);
  await assert.rejects(openWriter(top, PASS, 128 * 1024), UnsupportedImage);
  const w = await openWriter(path, PASS, CHUNK);
  await assert.rejects(w.write(4, randomBytes(CHUNK)), /outside/);
  await assert.rejects(w.write(1, randomBytes(100)), /has 100 bytes/);
  await w.close();
});

/** `qemu-img map` of the base: per range, whether it holds data or reads as zeros. */
function qemuMap(path: string): { start: number; length: number; data: boolean; zero: boolean }[] {
  const json = `json:${JSON.stringify({ driver: 'qcow2', file: { driver: 'file', filename: path }, encrypt: { format: 'luks', 'key-secret': 's' } })}`;
  const r = spawnSync('qemu-img', ['map', '--output=json', '--object', `secret,id=s,data=${PASS}`, json], { encoding: 'utf8' });
  assert.equal(r.status, 0, r.stderr);
  return JSON.parse(r.stdout) as { start: number; length: number; data: boolean; zero: boolean }[];
}

const dataAt = (map: ReturnType<typeof qemuMap>, offset: number) => map.find((m) => m.start <= offset && offset < m.start + m.length)!;

/** A base with extended L2 entries, as session 13 made them (bases are made without since: layer-template.ts). */
async function subclusteredBase(name: string, size: number): Promise<string> {
  const path = join(dir, name);
  await createWithQemu(['create', '-q', '-f', 'qcow2', '--object', SECRET_FD_OBJECT('s'), '-o', `encrypt.format=luks,encrypt.key-secret=s,encrypt.iter-time=10,cluster_size=${CHUNK},extended_l2=on`, path, String(size)], PASS);
  return path;
}

test('a base with extended L2 (session 13\'s): a chunk\'s subclusters of zeros are not written: pages over a hole write those they touch, a whole chunk those with data; later pages into a zero subcluster write it whole; QEMU reads it all back', async () => {
  const SUB = CHUNK / 32;
  const path = await subclusteredBase('sub.qcow2', 6 * CHUNK);
  const want = Buffer.alloc(6 * CHUNK);
  const w = await openWriter(path, PASS, CHUNK);
  const pieces = [{ offset: 4096, bytes: randomBytes(4096) }, { offset: 64 * 1024, bytes: randomBytes(64 * 1024) }];
  for (const p of pieces) Buffer.from(p.bytes).copy(want, CHUNK + p.offset);
  await w.writeOverZeros(1, CHUNK, pieces);
  const whole = randomBytes(CHUNK);
  whole.copy(want, 2 * CHUNK);
  await w.write(2, whole);
  // A whole chunk that is mostly zeros (free space in a file system): only its subcluster of data is written.
  const sparse = Buffer.alloc(CHUNK);
  randomFillSync(sparse, 5 * SUB, SUB);
  sparse.copy(want, 3 * CHUNK);
  await w.write(3, sparse);
  await w.persist();
  await w.close();
  let seen = qemuRead(path);
  assert.equal(seen.check, 0);
  assert.ok(seen.data.equals(want));
  // Only the touched subclusters hold data: the zeros between the pieces were never written.
  const map = qemuMap(path);
  assert.equal(dataAt(map, CHUNK).data, true);
  assert.deepEqual([dataAt(map, CHUNK + SUB), dataAt(map, CHUNK + 32 * 1024)].map((m) => [m.data, m.zero]), [[false, true], [false, true]]);
  assert.equal(dataAt(map, CHUNK + 64 * 1024).data, true);
  assert.equal(dataAt(map, CHUNK + 128 * 1024).data, false);
  assert.deepEqual([dataAt(map, 3 * CHUNK), dataAt(map, 3 * CHUNK + 5 * SUB), dataAt(map, 3 * CHUNK + 6 * SUB)].map((m) => m.data), [false, true, false]);

  // A later run (a second check-out's pages over that chunk): a piece inside a zero subcluster and one inside a written one.
  const again = await openWriter(path, PASS, CHUNK);
  const later = [{ offset: 2048, bytes: randomBytes(1024) }, { offset: SUB + 512, bytes: randomBytes(1024) }, { offset: 200 * 1024, bytes: randomBytes(512) }];
  for (const p of later) Buffer.from(p.bytes).copy(want, CHUNK + p.offset);
  await again.writePieces(1, later);
  // Pages over zeros where a chunk was written whole: the chunk is zeros and pages afterwards.
  const over = [{ offset: 0, bytes: randomBytes(SUB) }];
  want.fill(0, 2 * CHUNK, 3 * CHUNK);
  Buffer.from(over[0]!.bytes).copy(want, 2 * CHUNK);
  await again.writeOverZeros(2, CHUNK, over);
  const intoSparse = [{ offset: 7 * SUB - 512, bytes: randomBytes(1024) }];
  Buffer.from(intoSparse[0]!.bytes).copy(want, 3 * CHUNK + 7 * SUB - 512);
  await again.writePieces(3, intoSparse);
  await assert.rejects(again.writePieces(4, later), /not here to write pages over/);
  await again.persist();
  await again.close();
  seen = qemuRead(path);
  assert.equal(seen.check, 0);
  assert.ok(seen.data.equals(want), 'what QEMU reads is the zeros and pages');
});

test('a base as made now (no extended L2, as before session 13) takes pages over a hole as the whole chunk; QEMU reads it back', async () => {
  const path = await base('plain-l2.qcow2', 4 * CHUNK);
  const want = Buffer.alloc(4 * CHUNK);
  const w = await openWriter(path, PASS, CHUNK);
  const pieces = [{ offset: 8192, bytes: randomBytes(8192) }];
  Buffer.from(pieces[0]!.bytes).copy(want, 3 * CHUNK + 8192);
  await w.writeOverZeros(3, CHUNK, pieces);
  await w.persist();
  await w.close();
  const seen = qemuRead(path);
  assert.equal(seen.check, 0);
  assert.ok(seen.data.equals(want));
  assert.equal(dataAt(qemuMap(path), 3 * CHUNK + 128 * 1024).data, true, 'the whole cluster was written');
});
