import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, test } from 'node:test';
import { createLayerFromTemplate, createWithQemu } from '../../src/disk/layer-template.js';
import { SECRET_FD_OBJECT } from '../../src/qemu/qemu-tools.js';
import { unmapChunksExcept } from '../../src/disk/qcow2/qcow2-unmap.js';

const dir = mkdtempSync(join(tmpdir(), 'carryon-unmap-'));
after(() => rmSync(dir, { recursive: true, force: true }));
const CHUNK = 256 * 1024;
const image = (path: string) => `json:${JSON.stringify({ driver: 'qcow2', file: { driver: 'file', filename: path }, encrypt: { format: 'luks', 'key-secret': 's' }, backing: null })}`;
const qemuIo = (path: string, cmds: string[]) => spawnSync('qemu-io', ['--object', 'secret,id=s,data=pass', ...cmds.flatMap((c) => ['-c', c]), image(path)], { encoding: 'utf8' });

test('unmapping the chunks a parked base must not keep: they read as zeros, the others are intact, their clusters are freed (qemu-img check clean), and QEMU reuses them', async () => {
  const path = join(dir, 'base.qcow2');
  await createLayerFromTemplate(join(dir, 'templates'), { kind: 'base', clusterSize: CHUNK }, path, 8 * CHUNK, 'pass');
  await unmapCase(path, 6);
});

test('the same for a base with extended L2 (session 13 made them)', async () => {
  const path = join(dir, 'base-sub.qcow2');
  await createWithQemu(['create', '-q', '-f', 'qcow2', '--object', SECRET_FD_OBJECT('s'), '-o', `encrypt.format=luks,encrypt.key-secret=s,encrypt.iter-time=10,cluster_size=${CHUNK},extended_l2=on`, path, String(8 * CHUNK)], 'pass');
  // Chunk 6 holds one written subcluster, the rest of its entry says zeros.
  assert.equal(qemuIo(path, [`write -P 0x66 ${6 * CHUNK + 8192} 8192`]).status, 0);
  await unmapCase(path, 7);
});

async function unmapCase(path: string, chunks: number): Promise<void> {
  for (let i = 0; i < 6; i++) assert.equal(qemuIo(path, [`write -P ${0x10 + i} ${i * CHUNK} ${CHUNK}`]).status, 0);
  assert.equal(await unmapChunksExcept(path, CHUNK, new Set([0, 2, 5])), chunks - 3);
  for (let i = 0; i < chunks; i++) {
    const r = qemuIo(path, [`read -P ${[0, 2, 5].includes(i) ? 0x10 + i : 0} ${i * CHUNK} ${CHUNK}`]);
    assert.equal(r.status, 0, r.stderr);
    assert.doesNotMatch(r.stdout, /verification failed/, `chunk ${i}: ${r.stdout}`);
  }
  const check = spawnSync('qemu-img', ['check', '--object', 'secret,id=s,data=pass', image(path)], { encoding: 'utf8' });
  assert.equal(check.status, 0, `no leaks, no corruption: ${check.stdout}${check.stderr}`);
  // A new write takes a freed cluster: the file does not grow.
  const size = statSync(path).size;
  assert.equal(qemuIo(path, [`write -P 0x77 ${7 * CHUNK} ${CHUNK}`]).status, 0);
  assert.equal(statSync(path).size, size);
  // Running it again changes nothing (a rerun after a kill).
  assert.equal(await unmapChunksExcept(path, CHUNK, new Set([0, 2, 5, 7])), 0);
  // A 4 MiB-chunk disk (cluster ≠ chunk) is refused, as the Node base writer refuses it.
  await assert.rejects(unmapChunksExcept(path, 4 * CHUNK, new Set()), /cluster size/);
}
