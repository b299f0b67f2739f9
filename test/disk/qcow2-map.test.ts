import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { copyFile, mkdtemp, open, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import { chainFiles, createChain, layerSecret, mapChain, topExtents, type Chain } from '../../src/disk/chain.js';
import { Qcow2Reader } from '../../src/disk/qcow2/qcow2-reader.js';
import { appendRange, presentRanges } from '../../src/disk/qcow2/qcow2-map.js';
import { nonZeroEntries, UnsupportedImage } from '../../src/disk/qcow2/qcow2-format.js';
import { throughChain } from './fixtures.js';

// Not a whole number of clusters: the last one is cut at the disk's end.
const SIZE = 64 * 1024 * 1024 + 12 * 1024;
const CHUNK = 256 * 1024;

/** What `qemu-img map` says the top alone holds, merged as topExtents merges it. */
async function qemuPresent(chain: Chain): Promise<{ offset: number; length: number }[]> {
  const out: { offset: number; length: number }[] = [];
  for (const e of await mapChain(chain, 'top-alone')) if (e.present) appendRange(out, e.start, e.length);
  return out;
}

test('the top\'s own tables say what qemu-img map says it holds: data, zeros written, discards, the last cut cluster; other images are left to qemu-img', async () => {
  const dir = await mkdtemp(join(tmpdir(), 'carryon-map-'));
  try {
    const chain: Chain = { files: chainFiles(dir), secret: randomBytes(32).toString('hex'), baseSecret: randomBytes(32).toString('hex') };
    await createChain(chain, SIZE, CHUNK, process.env.CARRYON_TEMPLATE_DIR);
    assert.deepEqual(await presentRanges(chain.files.top), [], 'a new top holds nothing');
    await throughChain(dir, chain, async (nbd) => {
      await nbd.write(0, randomBytes(4096)); // part of the first cluster
      await nbd.write(3 * CHUNK - 512, randomBytes(8192)); // across a cluster boundary
      for (let i = 0; i < 40; i++) await nbd.write(((i * 7919) % 250) * CHUNK + 65536, randomBytes(65536)); // scattered, some twice
      await nbd.writeZeroes(20 * 1024 * 1024, 3 * CHUNK); // zeros over the base: the top says so
      await nbd.write(30 * 1024 * 1024, randomBytes(CHUNK));
      await nbd.trim(30 * 1024 * 1024, CHUNK); // a discard of what the top held
      await nbd.write(SIZE - 4096, randomBytes(4096)); // the last, cut cluster
    });
    const ours = await presentRanges(chain.files.top);
    assert.ok(ours.length > 10, `${ours.length} ranges`);
    assert.deepEqual(ours, await qemuPresent(chain));
    assert.deepEqual(await topExtents(chain), ours);
    assert.equal(ours[ours.length - 1]!.offset + ours[ours.length - 1]!.length, SIZE, 'the last range ends at the disk\'s end');

    // What a check-in reads of the top from Node: every byte it holds, as QEMU reads the chain there.
    const top = await Qcow2Reader.openTop(chain.files.top, layerSecret(chain, 'top'));
    try {
      await throughChain(dir, chain, async (nbd) => {
        for (const r of ours) {
          for (let at = r.offset; at < r.offset + r.length; at += 300 * 1024) {
            const n = Math.min(300 * 1024, r.offset + r.length - at);
            assert.ok((await top.read(at, n)).equals(await nbd.read(at, n)), `bytes ${at}+${n} as QEMU reads them`);
          }
        }
        // Pieces inside one subcluster, across subclusters and across clusters.
        for (const [at, n] of [[1000, 2000], [3 * CHUNK - 512, 8192], [3 * CHUNK - 100, 200]] as const) assert.ok((await top.read(at, n)).equals(await nbd.read(at, n)), `${at}+${n}`);
      });
      assert.ok((await top.read(20 * 1024 * 1024, 3 * CHUNK)).equals(Buffer.alloc(3 * CHUNK)), 'zeros written read as zeros');
      // A byte the top leaves to its backing file is not the top's to answer.
      await assert.rejects(top.read(10 * 1024 * 1024 + 1, 10), /not held by this layer/);
      await assert.rejects(top.read(4096 - 10, 20), /not held by this layer/, 'a read running past the held bytes is refused whole');
    } finally {
      await top.close();
    }

    // An incompatible feature this parser does not know (here: "dirty"): refused, so topExtents asks qemu-img.
    const odd = join(dir, 'odd.qcow2');
    await copyFile(chain.files.top, odd);
    const fh = await open(odd, 'r+');
    try {
      const flags = Buffer.alloc(8);
      flags.writeBigUInt64BE(1n);
      await fh.write(flags, 0, 8, 72);
    } finally {
      await fh.close();
    }
    await assert.rejects(presentRanges(odd), (e: unknown) => e instanceof UnsupportedImage && /incompatible features 0x1/.test((e as Error).message));
    await assert.rejects(Qcow2Reader.openTop(odd, layerSecret(chain, 'top')), (e: unknown) => e instanceof UnsupportedImage, 'the check-in reads such a top through QEMU');
    // A header edited to ask for a huge L1 table (the check-in opens its tops before their shape is checked): refused, nothing allocated.
    const huge = join(dir, 'huge.qcow2');
    await copyFile(chain.files.top, huge);
    const hh = await open(huge, 'r+');
    try {
      const l1Size = Buffer.alloc(4);
      l1Size.writeUInt32BE(0xffffffff);
      await hh.write(l1Size, 0, 4, 36);
    } finally {
      await hh.close();
    }
    await assert.rejects(Qcow2Reader.openTop(huge, layerSecret(chain, 'top')), /an L1 table of 4294967295 entries/);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});

test('nonZeroEntries finds every entry with a bit set: either word of a 16-byte entry, across 4 KiB runs, in a table of odd length', () => {
  for (const entryBytes of [8, 16] as const) {
    const table = Buffer.alloc(3 * 4096 + 2 * entryBytes);
    const want: number[] = [];
    // The first entry, one at each 4 KiB edge, one in the last short run; a lone low bit in each of a 16-byte entry's words.
    for (const [entry, byte] of [[0, entryBytes - 1], [4096 / entryBytes - 1, 0], [4096 / entryBytes, entryBytes - 1], [2 * 4096 / entryBytes + 3, 7], [3 * 4096 / entryBytes + 1, entryBytes === 16 ? 8 : 3]] as const) {
      table[entry * entryBytes + byte] = 1;
      want.push(entry);
    }
    assert.deepEqual(nonZeroEntries(table, entryBytes), want, `${entryBytes}-byte entries`);
    assert.deepEqual(nonZeroEntries(Buffer.alloc(8192), entryBytes), [], 'an empty table');
  }
});
