import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { readdirSync, readFileSync } from 'node:fs';
import { test } from 'node:test';
import { openBlob, sealChunk } from '../../src/core/chunks/blob.js';
import { computeChunkId } from '../../src/core/chunk-id.js';
import { sealPages } from '../../src/core/chunks/delta.js';
import { generateLineageKeys } from '../../src/core/keys.js';
import { PushChecks } from '../../src/transfer/push-checks.js';
import { rawPagesBlob, rleBomb } from '../support/hostile-zstd.js';

const CS = 256 * 1024;

for (const [size, background] of [[0, false], [2, false], [0, true]] as const) {
  test(`push checks (${background ? 'background lane' : size ? `${size} worker threads` : 'inline'}): pages are rebuilt on their base (or zeros) and named; a hole, an unchanged chunk and forged pages are told apart`, async () => {
    const keys = generateLineageKeys();
    const inner = new PushChecks(size);
    const checks = { name: (...a: Parameters<PushChecks['name']>) => inner.name(a[0], a[1], a[2], a[3], { background }) };
    try {
      const base = randomBytes(CS);
      const b = sealChunk(keys, base);
      const written = randomBytes(8192);
      const next = Buffer.from(base);
      written.copy(next, 4096);
      const pages = sealPages(keys, b.id, CS, [{ offset: 4096, bytes: written }]);
      const named = await checks.name(keys, pages, { id: b.id, blob: b.blob }, '#1');
      assert.equal(named.id, computeChunkId(keys.idKey, next));
      assert.deepEqual(openBlob(keys, named.id!, named.blob!), next);
      assert.ok(b.blob.length > 0, 'the base blob was copied, not moved');

      // No base: the rest of the chunk is zeros (a chunk that was a hole in the checkpoint), and a short last chunk.
      const fresh = sealPages(keys, null, 10_000, [{ offset: 0, bytes: written.subarray(0, 4096) }]);
      const expected = Buffer.alloc(10_000);
      written.copy(expected, 0, 0, 4096);
      const n2 = await checks.name(keys, fresh, null, '#2');
      assert.deepEqual(openBlob(keys, n2.id!, n2.blob!), expected);

      // Written back to the base's bytes: no change, nothing to store. Written to zeros: a hole.
      const same = await checks.name(keys, sealPages(keys, b.id, CS, [{ offset: 4096, bytes: base.subarray(4096, 12288) }]), { id: b.id, blob: b.blob }, '#3');
      assert.deepEqual(same, { id: b.id, blob: null });
      assert.deepEqual(await checks.name(keys, sealPages(keys, null, CS, [{ offset: 0, bytes: Buffer.alloc(CS) }]), null, '#4'), { id: null, blob: null });

      // Pages sealed against one base do not open against another (nor against none), nor under other keys.
      const other = sealChunk(keys, randomBytes(CS));
      await assert.rejects(checks.name(keys, pages, { id: other.id, blob: other.blob }, '#5'), /#5.*GCM tag does not verify/);
      await assert.rejects(checks.name(keys, pages, null, '#6'), /GCM tag does not verify/);
      await assert.rejects(checks.name(generateLineageKeys(), pages, { id: b.id, blob: b.blob }, '#7'), /GCM tag does not verify/);
      const forged = Buffer.from(pages);
      forged[40]! ^= 1;
      await assert.rejects(checks.name(keys, forged, { id: b.id, blob: b.blob }, '#8'), /GCM tag does not verify/);

      // Decompression bombs (issue 22): refused by the bound, on the threads as inline.
      await assert.rejects(checks.name(keys, rawPagesBlob(keys, rleBomb({ blocks: 2048 })), null, '#9'), /#9.*\(decompress\): the zstd frame does not declare its size/);
      await assert.rejects(checks.name(keys, rawPagesBlob(keys, rleBomb({ blocks: 2048, declare: 'true' }), b.id), { id: b.id, blob: b.blob }, '#10'), /#10.*\(too-large\)/);
    } finally {
      await inner.close();
    }
  });
}

/** Nice (field 19 of stat) and scheduling policy (field 41) of every thread of this process. */
function threads(only?: number): { nice: number; policy: number }[] {
  return (only ? [String(only)] : readdirSync('/proc/self/task')).flatMap((t) => {
    try {
      const f = readFileSync(`/proc/self/task/${t}/stat`, 'utf8').split(') ')[1]!.split(' ');
      return [{ nice: Number(f[16]), policy: Number(f[38]) }];
    } catch {
      return []; // the thread ended meanwhile
    }
  });
}

test('background replicas are rebuilt on threads at nice 19 in SCHED_IDLE; users\' pushes and the main thread keep their priority', { skip: process.platform !== 'linux' }, async () => {
  const keys = generateLineageKeys();
  const checks = new PushChecks(0);
  try {
    const pages = sealPages(keys, null, CS, [{ offset: 0, bytes: randomBytes(4096) }]);
    await checks.name(keys, pages, null, '#1');
    assert.equal(threads().filter((t) => t.nice === 19).length, 0, 'a user\'s push runs inline at the server\'s priority');
    await checks.name(keys, pages, null, '#2', { background: true });
    const idle = threads().filter((t) => t.nice === 19);
    assert.equal(idle.length, 1, `one background thread at nice 19: ${JSON.stringify(threads())}`);
    assert.equal(idle[0]!.policy, 5, 'in SCHED_IDLE');
    assert.equal(threads(process.pid)[0]!.nice, 0, 'the main thread keeps its nice value');
  } finally {
    await checks.close();
  }
});
