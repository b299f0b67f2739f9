import assert from 'node:assert/strict';
import { test } from 'node:test';
import { planMergedReads } from '../../src/store/merged-reads.js';
import { RECORD_HEAD } from '../../src/store/pack-index.js';

const at = (pack: string, offset: number, length = 100) => ({ pack, offset, length });

test('merged reads: neighbours within the gap share a range, other packs and far records do not, a range stays under max', () => {
  const rec = RECORD_HEAD + 100;
  const locs = [at('b', 0), at('a', rec + 10), at('a', 0), at('a', 10_000), at('a', 2 * rec + 10)];
  const ranges = planMergedReads(locs, { gap: 64, max: 10 * rec });
  assert.deepEqual(ranges, [
    { pack: 'a', start: 0, end: 3 * rec + 10, members: [2, 1, 4] },
    { pack: 'a', start: 10_000, end: 10_000 + rec, members: [3] },
    { pack: 'b', start: 0, end: rec, members: [0] },
  ]);
  // The same records with a range limit of two records: the third starts a new range.
  const capped = planMergedReads(locs, { gap: 64, max: 2 * rec + 10 });
  assert.deepEqual(capped.map((r) => r.members), [[2, 1], [4], [3], [0]]);
  assert.deepEqual(planMergedReads([], { gap: 64, max: 1 }), []);
});
