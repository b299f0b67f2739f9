import assert from 'node:assert/strict';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, test } from 'node:test';
import { readFilled, writeFilled } from '../../src/live/fill/fill-direct.js';

const dir = mkdtempSync(join(tmpdir(), 'carryon-filled-'));
after(() => rmSync(dir, { recursive: true, force: true }));

test('filled.json: what was written reads back; missing or damaged (a laptop owner editing it) reads as nothing filled, so those chunks are fetched again', async () => {
  await writeFilled(dir, [3, 0, 16383]);
  assert.deepEqual([...(await readFilled(dir))].sort((a, b) => a - b), [0, 3, 16383]);
  const damaged: unknown[] = [{ v: 1, chunks: [1, -1] }, { v: 1, chunks: [1, 2.5] }, { v: 1, chunks: ['1'] }, { v: 1, chunks: {} }, { v: 2, chunks: [1] }, 'not json'];
  for (const body of damaged) {
    writeFileSync(join(dir, 'filled.json'), typeof body === 'string' ? body : JSON.stringify(body));
    assert.equal((await readFilled(dir)).size, 0, JSON.stringify(body));
  }
  rmSync(join(dir, 'filled.json'));
  assert.equal((await readFilled(dir)).size, 0);
});
