import assert from 'node:assert/strict';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import { DirBackend } from '../../src/store/backend/dir-backend.js';
import { BufferedPackSink, type Backend, type ObjectInfo, type ObjectKind, type PackSink } from '../../src/store/backend/backend.js';
import { SqlitePackIndex, type PackIndex } from '../../src/store/pack-index.js';
import { PackRepository } from '../../src/store/pack-repository.js';
import { dyingIndex } from '../support/dying-index.js';

/**
 * The chunk repository alone, over a backend in memory: group commit, damage checks, compaction
 * and what a crash between a pack's write and its index commit leaves. Two kinds of backend: one
 * whose packs take appends after a flush (as files do) and one that writes each pack whole (as
 * an object store does).
 */
class MemoryBackend implements Backend {
  readonly label = 'memory';
  readonly mergeReads = { gap: 1024, max: 1024 * 1024 };
  readonly objects = new Map<string, { data: Buffer; modifiedAt: number }>();
  reads = 0;
  writes = 0;
  /** Makes every durable write fail (a full disk, an unreachable bucket). */
  down = false;
  /** Holds every durable write until it settles. */
  gate: Promise<void> | null = null;

  constructor(readonly appendAfterFlush: boolean) {}

  async createPack(name: string): Promise<PackSink> {
    if (!this.appendAfterFlush) return new BufferedPackSink(this, name);
    const key = `packs/${name}`;
    this.objects.set(key, { data: Buffer.alloc(0), modifiedAt: Date.now() });
    return {
      write: async (bytes, offset) => {
        const o = this.objects.get(key)!;
        const data = Buffer.alloc(Math.max(o.data.length, offset + bytes.length));
        o.data.copy(data);
        bytes.copy(data, offset);
        o.data = data;
      },
      flush: async () => {
        await this.gate;
        if (this.down) throw new Error('device unavailable');
        this.writes++;
      },
      read: (offset, length) => this.read('packs', name, offset, length),
    };
  }

  async read(kind: ObjectKind, name: string, offset?: number, length?: number): Promise<Buffer | null> {
    this.reads++;
    const o = this.objects.get(`${kind}/${name}`);
    if (!o) return null;
    return Buffer.from(offset === undefined || length === undefined ? o.data : o.data.subarray(offset, offset + length));
  }

  async write(kind: ObjectKind, name: string, data: Uint8Array): Promise<void> {
    await this.gate;
    if (this.down) throw new Error('device unavailable');
    this.writes++;
    this.objects.set(`${kind}/${name}`, { data: Buffer.from(data), modifiedAt: Date.now() });
  }

  async *list(kind: ObjectKind): AsyncIterable<ObjectInfo> {
    for (const [key, o] of [...this.objects].sort()) {
      if (key.startsWith(`${kind}/`)) yield { name: key.slice(kind.length + 1), bytes: o.data.length, modifiedAt: o.modifiedAt };
    }
  }

  async delete(kind: ObjectKind, name: string): Promise<void> {
    this.objects.delete(`${kind}/${name}`);
  }

  async close(): Promise<void> {}
}

const id = (n: number) => n.toString(16).padStart(64, '0');
const blob = (n: number, size = 100) => Buffer.alloc(size, n);
const kinds = [['file', true], ['object', false]] as const;

function repository(backend: MemoryBackend, index: PackIndex = SqlitePackIndex.open(':memory:'), packBytes = 1024 * 1024): PackRepository {
  return new PackRepository(backend, index, { packBytes, touchSlackMs: 0 });
}

/** Every blob the index names can be read whole from a pack that exists. */
async function everyRowResolves(index: PackIndex, backend: MemoryBackend): Promise<number> {
  const reader = repository(backend, index);
  let n = 0;
  for await (const row of index.list()) {
    assert.ok(backend.objects.has(`packs/${row.pack}`), `pack ${row.pack} of ${row.id} exists`);
    assert.equal((await reader.get(row.id))?.length, row.length);
    n++;
  }
  return n;
}

for (const [kind, appendable] of kinds) {
  test(`repository (${kind} backend): deferred puts are published together at sync, readable before it`, async () => {
    const backend = new MemoryBackend(appendable);
    const index = dyingIndex(SqlitePackIndex.open(':memory:'), {});
    const repo = repository(backend, index);
    await Promise.all(Array.from({ length: 10 }, (_, i) => repo.put(id(i), blob(i), { defer: true })));
    assert.equal(await index.get(id(3)), null, 'not published yet');
    assert.deepEqual(await repo.get(id(3)), blob(3), 'but served to this process');
    assert.equal(await repo.put(id(3), blob(3), { defer: true }), false, 'a second put is a no-op');
    await Promise.all([repo.sync(), repo.sync()]);
    assert.equal(index.inserts, 1, 'one index commit for the batch');
    assert.equal(backend.writes, 1, 'one durable write of one pack');
    assert.deepEqual(await repo.missing([id(1), id(11), id(1)]), [id(11)]);
    await repo.sync();
    assert.equal(backend.writes, 1, 'a sync with nothing pending writes nothing');
    await repo.delete(id(1));
    assert.deepEqual(await repo.stats(), { chunks: 9, bytes: 900 });
    // A blob deleted while its pack is on its way is not published.
    let open!: () => void;
    backend.gate = new Promise((r) => (open = r));
    await repo.put(id(20), blob(20), { defer: true });
    const syncing = repo.sync();
    await new Promise((r) => setImmediate(r));
    await repo.delete(id(20));
    open();
    await syncing;
    assert.equal(await index.get(id(20)), null);
    assert.equal(await repo.get(id(20)), null);
    await repo.putManifest(id(99), Buffer.from('manifest'));
    assert.deepEqual(await repo.getManifest(id(99)), Buffer.from('manifest'));
    await assert.rejects(repo.getManifest('../x'), /not a manifest digest/);
    await repo.close();
  });

  test(`repository (${kind} backend): a crash between the pack write and the index commit leaves nothing referenced that does not exist`, async () => {
    const backend = new MemoryBackend(appendable);
    const base = SqlitePackIndex.open(':memory:');
    const failing = { insert: false, relocate: false };
    const crashed = repository(backend, dyingIndex(base, failing));
    await crashed.put(id(1), blob(1));
    failing.insert = true;
    await crashed.put(id(2), blob(2), { defer: true });
    await assert.rejects(crashed.sync(), /killed before the index commit/);
    // The process is gone: what another (or the next) process finds.
    const after = repository(backend, base);
    assert.equal(await everyRowResolves(base, backend), 1);
    assert.deepEqual(await after.get(id(1)), blob(1));
    assert.equal(await after.get(id(2)), null, 'never published');
    const usage = await after.packUsage();
    assert.ok(usage.packBytes > usage.liveBytes, 'its record is only dead bytes');
    // Garbage collection: a pack our pid wrote that no process of ours still writes is fair game.
    await after.sweep([id(1)], Date.now() + 1);
    for (const p of await after.packs()) {
      assert.equal(p.active, false);
      assert.equal(await after.dropPack(p), p.bytes);
    }
    assert.deepEqual(await after.packs(), []);

    // Compaction killed between writing the new pack and moving the rows: the old pack still holds them.
    const again = repository(backend, dyingIndex(base, failing));
    failing.insert = false;
    await Promise.all([3, 4, 5].map((n) => again.put(id(n), blob(n), { defer: true })));
    await again.sync();
    await again.sealPacks();
    await again.sweep([id(3)], Date.now() + 1);
    const [old] = await again.packs();
    failing.relocate = true;
    await assert.rejects(again.compactPack(old!), /killed before the index commit/);
    const survivor = repository(backend, base);
    assert.equal(await everyRowResolves(base, backend), 2);
    assert.equal((await survivor.packs()).length, 2, 'the copy is an unreferenced pack');
    for (const p of await survivor.packs()) if (p.liveBytes === 0) assert.equal(await survivor.dropPack(p), p.bytes);
    const [kept] = await survivor.packs();
    assert.deepEqual(await survivor.compactPack(kept!), { moved: 2, freedBytes: kept!.bytes });
    assert.deepEqual(await survivor.get(id(5)), blob(5));
    await survivor.close();
  });
}

test('repository: a pack that cannot be written keeps its blobs pending and unpublished until a sync succeeds', async () => {
  const backend = new MemoryBackend(false);
  const index = SqlitePackIndex.open(':memory:');
  const repo = repository(backend, index);
  backend.down = true;
  await repo.put(id(1), blob(1), { defer: true });
  await assert.rejects(repo.sync(), (err: Error & { code?: string }) => err.code === 'store-unavailable' && /writing 1 pack\(s\) to memory failed \(kept for the next sync\)/.test(err.message));
  assert.equal(await index.get(id(1)), null);
  assert.equal([...backend.objects.keys()].length, 0);
  assert.deepEqual(await repo.get(id(1)), blob(1), 'still served from memory');
  backend.down = false;
  await repo.sync();
  assert.equal((await index.get(id(1)))?.length, 100);
  await repo.close();
});

test('repository: records are checked against the index; a pack name no writer makes is damage, not a path', async () => {
  const backend = new MemoryBackend(true);
  const index = SqlitePackIndex.open(':memory:');
  const repo = repository(backend, index);
  await repo.put(id(1), blob(1));
  await repo.put(id(2), blob(2));
  const loc = (await index.get(id(2)))!;
  await index.relocate([{ id: id(2), from: loc, to: { ...loc, offset: 0 } }]);
  await assert.rejects(repo.get(id(2)), /does not hold chunk/);
  await index.relocate([{ id: id(2), from: { ...loc, offset: 0 }, to: { ...loc, pack: '../../etc/passwd' } }]);
  await assert.rejects(repo.get(id(2)), /index names an invalid pack/);
  await repo.close();
  // And the directory backend on its own never turns a name into a path outside its folders.
  const dir = mkdtempSync(join(tmpdir(), 'carryon-dirbackend-'));
  try {
    const files = await DirBackend.open(dir);
    for (const name of ['../index.sqlite', '.hidden', 'a/b', '']) await assert.rejects(files.read('packs', name, 0, 10), /not a stored object name/);
    await assert.rejects(files.write('manifests', '../../x', Buffer.from('x')), /not a stored object name/);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('repository: getMany reads neighbours in one request, agrees with get, serves pending blobs', async () => {
  const backend = new MemoryBackend(false);
  const repo = repository(backend, SqlitePackIndex.open(':memory:'), 16 * 1024);
  await Promise.all(Array.from({ length: 20 }, (_, i) => repo.put(id(i), blob(i, 1000), { defer: true })));
  await repo.sync();
  assert.ok((await repo.packs()).length >= 2, 'a full pack is sealed and a new one begun');
  await repo.put(id(50), blob(50), { defer: true });
  backend.reads = 0;
  const got = await repo.getMany([id(0), id(1), id(2), id(3), id(77), id(50)]);
  assert.equal(backend.reads, 1, 'four neighbours in one read; the pending one from memory');
  assert.deepEqual(got, [blob(0, 1000), blob(1, 1000), blob(2, 1000), blob(3, 1000), null, blob(50)]);
  await repo.close();
});
