// carryon-test: serial (templates are made by qemu-img, whose LUKS PBKDF benchmark takes both cores)
import assert from 'node:assert/strict';
import { execFileSync, spawnSync } from 'node:child_process';
import { copyFileSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, test } from 'node:test';
import { ensureTemplate, growEmptyLayer, rekeyImage, type LayerShape } from '../../src/disk/layer-template.js';

const dir = mkdtempSync(join(tmpdir(), 'carryon-grow-'));
after(() => rmSync(dir, { recursive: true, force: true }));
const PASS = 'grow-secret';
const templates = join(dir, 'templates');

/** A fresh copy of the template of `shape`, keyed with PASS. */
async function emptyLayer(name: string, shape: LayerShape): Promise<string> {
  const path = join(dir, name);
  copyFileSync(await ensureTemplate(templates, shape), path);
  await rekeyImage(path, Buffer.from(PASS));
  return path;
}

const opts = (path: string) => `json:${JSON.stringify({ driver: 'qcow2', file: { driver: 'file', filename: path }, encrypt: { format: 'luks', 'key-secret': 's' }, backing: null })}`;

function qemuIo(path: string, commands: string[]) {
  return spawnSync('qemu-io', ['--object', `secret,id=s,data=${PASS}`, ...commands.flatMap((c) => ['-c', c]), opts(path)], { encoding: 'utf8' });
}

function virtualSize(path: string): number {
  return (JSON.parse(execFileSync('qemu-img', ['info', '--output=json', '-U', path], { encoding: 'utf8' })) as { 'virtual-size': number })['virtual-size'];
}

const checkClean = (path: string) => execFileSync('qemu-img', ['check', '-q', '--object', `secret,id=s,data=${PASS}`, opts(path)]);

test('an empty layer grown from Node is what qemu-img resize makes: its size, a clean check, data kept at the last sector, across several L1 entries', async () => {
  const cases: { shape: LayerShape; size: number }[] = [
    { shape: { kind: 'base', clusterSize: 256 * 1024 }, size: 3 * 2 ** 30 + 512 }, // one L1 entry (8 GiB each)
    { shape: { kind: 'base', clusterSize: 64 * 1024 }, size: 20 * 2 ** 30 }, // 40 L1 entries of 512 MiB
    { shape: { kind: 'top', clusterSize: 256 * 1024 }, size: 16 * 2 ** 30 + 4096 }, // extended L2: 4 GiB per entry, 5 entries
  ];
  for (const [i, { shape, size }] of cases.entries()) {
    const ours = await emptyLayer(`ours-${i}.qcow2`, shape);
    assert.equal(await growEmptyLayer(ours, size), true, `${shape.kind} ${shape.clusterSize} to ${size}`);
    const theirs = await emptyLayer(`theirs-${i}.qcow2`, shape);
    execFileSync('qemu-img', ['resize', '-q', '--object', `secret,id=s,data=${PASS}`, opts(theirs), String(size)]);
    assert.equal(virtualSize(ours), size);
    assert.equal(virtualSize(ours), virtualSize(theirs));
    checkClean(ours);
    const last = size - 512;
    const io = qemuIo(ours, ['read -P 0 0 512', `read -P 0 ${last} 512`, `write -P 0x6b ${last} 512`, `read -P 0x6b ${last} 512`]);
    assert.equal(io.status, 0, io.stderr + io.stdout);
    assert.doesNotMatch(io.stdout, /Pattern verification failed|error/i);
    checkClean(ours);
    // Past the end is refused, as for QEMU's own resize.
    const past = qemuIo(ours, [`write -P 1 ${size} 512`]);
    assert.match(past.stdout + past.stderr, /out of range|Input\/output|Invalid argument|beyond/i);
  }
});

test('a layer that is not empty, a shrink, or an unaligned size is left to qemu-img, the file untouched', async () => {
  const shape: LayerShape = { kind: 'base', clusterSize: 256 * 1024 };
  const used = await emptyLayer('used.qcow2', shape);
  const io = qemuIo(used, ['write -P 0x11 0 64k']);
  assert.equal(io.status, 0, io.stderr);
  const before = readFileSync(used);
  assert.equal(await growEmptyLayer(used, 2 ** 30), false, 'a mapped cluster');
  assert.ok(readFileSync(used).equals(before));
  const empty = await emptyLayer('empty.qcow2', shape);
  const size = virtualSize(empty);
  const untouched = readFileSync(empty);
  assert.equal(await growEmptyLayer(empty, size - 512 * 1024), false, 'a shrink');
  assert.equal(await growEmptyLayer(empty, 2 ** 30 + 100), false, 'not whole sectors');
  assert.ok(readFileSync(empty).equals(untouched));
});
