import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { test } from 'node:test';
import { computeChunkId } from '../../src/core/chunk-id.js';
import type { Manifest } from '../../src/core/chunks/manifest.js';
import type { BaseSink } from '../../src/live/fill/fill-direct.js';
import { chunkIndex, copyLocalChunks, type ChunkSource } from '../../src/live/fill/local-copy.js';

const SIZE = 4096;
const idKey = randomBytes(32);

/** One in-memory "base" that is both the source (its old chunks) and the sink (the copies). */
function sameFile(chunks: Buffer[]): { source: (wanted: Set<string>, m: Manifest) => ChunkSource; sink: BaseSink; data: Buffer[] } {
  const data: Buffer[] = chunks.map((c) => Buffer.from(c));
  return {
    data,
    source: (wanted, m) => ({ label: 'parked', at: chunkIndex(m, null, wanted), sameFileAsTarget: true, read: async (i) => Buffer.from(data[i]!), close: async () => undefined }),
    sink: { write: async (i, plain) => void (data[i] = plain), persist: async () => undefined, close: async () => undefined },
  };
}

const manifest = (chunks: Buffer[]): Manifest => ({ chunkSize: SIZE, diskSize: SIZE * chunks.length, chunks: chunks.map((c) => computeChunkId(idKey, c)) });

test('chunks that moved inside one file are copied: a rotation survives (reads of a batch before its writes); an index written over is never read as a source again', async () => {
  // Indexes 0–31 (one batch of 32) each take the next one's old chunk; 32, in the next batch, takes 0's old one, which index 0
  // no longer holds; 33 and 34 swap theirs.
  const old = Array.from({ length: 40 }, () => randomBytes(SIZE));
  const next = [...old];
  for (let i = 0; i < 32; i++) next[i] = old[i + 1]!;
  next[32] = old[0]!;
  [next[33], next[34]] = [old[34]!, old[33]!];
  const parked = manifest(old);
  const target = manifest(next);
  const present = new Set(target.chunks.flatMap((id, i) => (id === parked.chunks[i] ? [i] : [])));
  const file = sameFile(old);
  const wanted = new Set(target.chunks.filter((id, i): id is string => id !== null && !present.has(i)));
  const logs: string[] = [];
  const r = await copyLocalChunks({ target, present, sources: [file.source(wanted, parked)], sink: file.sink, idKey, log: (l) => logs.push(l) });
  assert.deepEqual(r.written.sort((a, b) => a - b), [...Array.from({ length: 32 }, (_, i) => i), 33, 34], 'index 32 is left to the transfer');
  assert.equal(r.rejected, 0, `no stale source was read\n${logs.join('\n')}`);
  for (const i of r.written) assert.ok(file.data[i]!.equals(next[i]!), `index ${i} holds its new chunk`);
});

test('a local chunk whose bytes do not match its ID is not written: counted, logged, left to the transfer', async () => {
  const chunks = Array.from({ length: 3 }, () => randomBytes(SIZE));
  const target = manifest(chunks);
  const sibling = chunks.map((c) => Buffer.from(c));
  sibling[1]![100] ^= 1;
  const writes: number[] = [];
  const logs: string[] = [];
  const source: ChunkSource = { label: 'sibling', at: chunkIndex(target, null, new Set(target.chunks as string[])), read: async (i) => Buffer.from(sibling[i]!), close: async () => undefined };
  const r = await copyLocalChunks({ target, present: new Set(), sources: [source], sink: { write: async (i) => void writes.push(i), persist: async () => undefined, close: async () => undefined }, idKey, log: (l) => logs.push(l) });
  assert.deepEqual(r.written.sort(), [0, 2]);
  assert.deepEqual(writes.sort(), [0, 2]);
  assert.equal(r.rejected, 1);
  assert.match(logs.join('\n'), /sibling, index 1: its bytes do not match the chunk ID/);
});
