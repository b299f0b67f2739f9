import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { test } from 'node:test';
import { openBlob, sealChunk } from '../../src/core/blob.js';
import { sealDeltaRanges } from '../../src/core/delta.js';
import { generateLineageKeys } from '../../src/core/keys.js';
import { PushChecks } from '../../src/transfer/push-checks.js';

const CS = 256 * 1024;

for (const size of [0, 2]) {
  test(`push checks (${size ? `${size} worker threads` : 'inline'}): a blob is authenticated, a delta rebuilt, sealed and checked; bad ones are refused with the reason`, async () => {
    const keys = generateLineageKeys();
    const checks = new PushChecks(size);
    try {
      const base = Buffer.alloc(CS);
      randomBytes(CS / 2).copy(base);
      const next = Buffer.from(base);
      randomBytes(65536).copy(next, 65536);
      const b = sealChunk(keys, base);
      const n = sealChunk(keys, next);
      await checks.verify(keys, n.id, n.blob);
      const forged = Buffer.from(n.blob);
      forged[forged.length - 1]! ^= 1;
      await assert.rejects(checks.verify(keys, n.id, forged), /GCM tag does not verify/);
      await assert.rejects(checks.verify(generateLineageKeys(), n.id, n.blob), /GCM tag does not verify/);
      // The caller's buffers stay whole (a frame's payload is stored after its check).
      assert.equal(n.blob.length > 0 && b.blob.length > 0, true);

      const delta = sealDeltaRanges(keys, n.id, b.id, next, [{ offset: 65536, length: 65536 }])!;
      const rebuilt = await checks.rebuild(keys, n.id, delta, { id: b.id, blob: b.blob });
      assert.deepEqual(openBlob(keys, n.id, rebuilt), next);
      assert.ok(b.blob.length > 0, 'the base blob was copied, not moved');
      // A delta applied to another base does not hash to the new ID.
      const other = sealChunk(keys, randomBytes(CS));
      await assert.rejects(checks.rebuild(keys, n.id, delta, { id: other.id, blob: other.blob }), /GCM tag does not verify|does not hash/);
      const lying = sealDeltaRanges(keys, other.id, b.id, next, [{ offset: 65536, length: 65536 }])!;
      await assert.rejects(checks.rebuild(keys, other.id, lying, { id: b.id, blob: b.blob }), /does not hash to the new ID/);
    } finally {
      await checks.close();
    }
  });
}
