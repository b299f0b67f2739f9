import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, test } from 'node:test';
import { createLayerFromTemplate } from '../../src/disk/layer-template.js';
import { unmapChunksExcept } from '../../src/disk/qcow2/qcow2-unmap.js';

const dir = mkdtempSync(join(tmpdir(), 'carryon-unmap-'));
after(() => rmSync(dir, { recursive: true, force: true }));
const CHUNK = 256 * 1024;
const image = (path: string) => `json:${JSON.stringify({ driver: 'qcow2', file: { driver: 'file', filename: path }, encrypt: { format: 'luks', 'key-secret': 's' }, backing: null })}`;
const qemuIo = (path: string, cmds: string[]) => spawnSync('qemu-io', ['--object', 'secret,id=s,data=pass', ...cmds.flatMap((c) => ['-c', c]), image(path)], { encoding: 'utf8' });

test('unmapping the chunks a parked base must not keep: they read as zeros, the others are intact, their clusters are freed (qemu-img check clean), and QEMU reuses them', async () => {
  const path = join(dir, 'base.qcow2');
  await createLayerFromTemplate(join(dir, 'templates'), { kind: 'base', clusterSize: CHUNK }, path, 8 * CHUNK, 'pass');
  for (let i = 0; i < 6; i++) assert.equal(qemuIo(path, [`write -P ${0x10 + i} ${i * CHUNK} ${CHUNK}`]).status, 0);
  assert.equal(await unmapChunksExcept(path, CHUNK, new Set([0, 2, 5])), 3);
  for (let i = 0; i < 6; i++) {
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
});
