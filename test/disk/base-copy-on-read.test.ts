import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { randomBytes, randomFillSync } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, test } from 'node:test';
import { copyOnReadSafe, createLayerFromTemplate, createWithQemu } from '../../src/disk/layer-template.js';
import { Qcow2BaseWriter } from '../../src/disk/qcow2/qcow2-base-writer.js';
import { SECRET_FD_OBJECT } from '../../src/qemu/qemu-tools.js';

/**
 * A base is filled by QEMU's copy-on-read while a VM or `serve` reads a desktop still arriving.
 * QEMU 7.2 aborts such a read when it starts past the first run of a cluster whose subclusters
 * differ (block/io.c: "skip_bytes < pnum"); session 13's bases had subclusters, and a serve taking
 * over a check-out crashed its storage daemon now and then (e2e/parked).
 */
const dir = mkdtempSync(join(tmpdir(), 'carryon-cor-'));
after(() => rmSync(dir, { recursive: true, force: true }));
const CHUNK = 256 * 1024;
const SUB = CHUNK / 32;
const PASS = randomBytes(32).toString('base64');
const templates = process.env.CARRYON_TEMPLATE_DIR ?? join(dir, 'templates');

/** qemu-io with copy-on-read on (as the fill's filter reads), each command in turn; its exit status. */
function readWithCopyOnRead(path: string, reads: [number, number][]): { status: number | null; out: string } {
  const image = `json:${JSON.stringify({ driver: 'qcow2', file: { driver: 'file', filename: path }, encrypt: { format: 'luks', 'key-secret': 's' } })}`;
  const r = spawnSync('qemu-io', ['-C', '--object', `secret,id=s,data=${PASS}`, ...reads.flatMap(([at, n]) => ['-c', `read ${at} ${n}`]), image], { encoding: 'utf8' });
  return { status: r.status, out: `${r.stdout}${r.stderr}` };
}

/** Chunks as a check-out writes them: one mostly zeros (data, zeros, data), one of pages over a hole. */
async function fill(path: string): Promise<void> {
  const w = await Qcow2BaseWriter.open(path, PASS, CHUNK);
  try {
    const sparse = Buffer.alloc(CHUNK);
    randomFillSync(sparse, 0, SUB);
    randomFillSync(sparse, 2 * SUB, SUB);
    await w.write(1, sparse);
    await w.writeOverZeros(2, CHUNK, [{ offset: 2 * SUB, bytes: randomBytes(SUB) }]);
    await w.persist();
  } finally {
    await w.close();
  }
}

// Each starts inside a cluster, past its first run, and crosses from data into zeros (or back).
const crossing: [number, number][] = [
  [CHUNK + 2 * SUB + SUB / 2, SUB],
  [CHUNK + SUB + 512, 2 * SUB],
  [2 * CHUNK + 2 * SUB + 4096, SUB],
  [2 * CHUNK + SUB + 4096, 2 * SUB],
];

test('a base as Carryon makes it is read with copy-on-read across any range (a desktop read while it arrives)', async () => {
  const path = join(dir, 'base.qcow2');
  await createLayerFromTemplate(templates, { kind: 'base', clusterSize: CHUNK }, path, 4 * CHUNK, PASS);
  await fill(path);
  assert.equal(await copyOnReadSafe(path), true);
  const r = readWithCopyOnRead(path, crossing);
  assert.equal(r.status, 0, r.out);
});

test('a base with subclusters (session 13 made them) is not one QEMU may fill by copy-on-read', async () => {
  const path = join(dir, 'sub.qcow2');
  await createWithQemu(['create', '-q', '-f', 'qcow2', '--object', SECRET_FD_OBJECT('s'), '-o', `encrypt.format=luks,encrypt.key-secret=s,encrypt.iter-time=10,cluster_size=${CHUNK},extended_l2=on`, path, String(4 * CHUNK)], PASS);
  await fill(path);
  assert.equal(await copyOnReadSafe(path), false);
  // Why: QEMU 7.2 aborts on the first of these reads.
  const r = readWithCopyOnRead(path, crossing);
  assert.notEqual(r.status, 0);
  assert.match(r.out, /skip_bytes < pnum/);
});
