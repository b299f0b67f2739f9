import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import { chainBytesOnDisk, chainFiles, convertChain, createChain, mergeTop, type Chain } from '../../src/disk/chain.js';
import { throughChain } from './fixtures.js';

const SIZE = 64 * 1024 * 1024;
const CHUNK = 256 * 1024;
const WRITE = 64 * 1024;

/** Writes `count` 64 KiB blocks of random bytes at scattered offsets through the chain (as a guest does); returns what the disk now holds. */
async function writeScattered(dir: string, chain: Chain, count: number): Promise<Buffer> {
  const expected = Buffer.alloc(SIZE);
  await throughChain(dir, chain, async (nbd) => {
    for (let i = 0; i < count; i++) {
      // Every other 64 KiB slot of the disk, in a shuffled order: many separate extents, some chunks hit twice.
      const at = ((i * 97) % (SIZE / WRITE / 2)) * 2 * WRITE;
      const data = randomBytes(WRITE);
      await nbd.write(at, data);
      data.copy(expected, at);
    }
  });
  return expected;
}

for (const [label, count] of [['one 64 KiB write (through the page cache)', 1], ['6 MiB of scattered writes (O_DIRECT)', 96]] as const) {
  test(`a merge of ${label} leaves the base holding every write`, async () => {
    const dir = await mkdtemp(join(tmpdir(), 'carryon-merge-'));
    try {
      const chain: Chain = { files: chainFiles(dir), secret: randomBytes(32).toString('hex'), baseSecret: randomBytes(32).toString('hex') };
      await createChain(chain, SIZE, CHUNK, process.env.CARRYON_TEMPLATE_DIR);
      const expected = await writeScattered(dir, chain, count);
      const { top } = await chainBytesOnDisk(chain.files);
      assert.ok(count === 1 ? top < 4 << 20 : top >= 4 << 20, `the top holds ${top} bytes: on the ${count === 1 ? 'page cache' : 'O_DIRECT'} side of mergeTop's bound`);
      await mergeTop(chain);
      // The top is emptied by the merge: the chain reads the base alone.
      const out = join(dir, 'out.raw');
      await convertChain(chain, out, 'raw');
      assert.ok((await readFile(out)).equals(expected), 'the merged chain reads back every write');
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });
}
