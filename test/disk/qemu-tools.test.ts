import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { chmodSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { CarryonError } from '../../src/core/errors.js';
import { createLayerFromTemplate } from '../../src/disk/layer-template.js';
import { qemuFailure, runQemuTool, SECRET_FD_OBJECT } from '../../src/qemu/qemu-tools.js';
import { addLayer, StorageDaemon } from '../../src/disk/storage-daemon.js';

const dir = mkdtempSync(join(tmpdir(), 'carryon-qemu-tools-'));
const image = join(dir, 'luks.qcow2');
const SECRET = 'the-right-secret';
const imageOpts = (id: string) => `driver=qcow2,file.filename=${image},encrypt.key-secret=${id}`;

// From the suite's shared layer template: a LUKS qcow2 in milliseconds, not QEMU's ≈ 2 s PBKDF benchmark.
before(() => createLayerFromTemplate(process.env.CARRYON_TEMPLATE_DIR ?? join(dir, 'templates'), { kind: 'base', clusterSize: 65536 }, image, 16 << 20, SECRET));
after(() => rmSync(dir, { recursive: true, force: true }));

const is = (code: string, pattern: RegExp) => (err: unknown) => err instanceof CarryonError && err.code === code && pattern.test(err.message);

test('QEMU 7.2\'s own words: lock conflicts are disk-busy; a key slot that does not open is not', () => {
  for (const busy of ['Failed to get "write" lock', 'Failed to get shared "write" lock\nIs another process using the image [x.qcow2]?', 'Failed to get "consistent read" lock', 'Failed to lock byte 100']) {
    assert.equal(qemuFailure(`qemu-img: Could not open 'x': ${busy}`)?.code, 'disk-busy', busy);
  }
  assert.equal(qemuFailure("qemu-img: Could not open 'x': Invalid password, cannot unlock any keyslot")?.code, 'disk-key-refused');
  assert.equal(qemuFailure('Could not unlock the clock'), null, 'a word with "lock" in it is no lock conflict');
});

test('a tool that is not installed is named as missing (through setpriv)', async () => {
  await assert.rejects(runQemuTool('qemu-img-not-installed', ['info']), is('missing-tool', /qemu-img-not-installed is not installed/));
});

test('qemu-img on a LUKS qcow2 whose secret does not open it: "disk key does not open", never "in use"', async () => {
  const ok = await runQemuTool('qemu-img', ['info', '--output=json', '--object', SECRET_FD_OBJECT('s0'), '--image-opts', imageOpts('s0')], { secret: SECRET });
  assert.match(ok.stdout, /"encrypted": true/);
  await assert.rejects(
    runQemuTool('qemu-img', ['map', '--output=json', '--object', SECRET_FD_OBJECT('s0'), '--image-opts', imageOpts('s0')], { secret: 'a-damaged-key' }),
    is('disk-key-refused', /disk key does not open the disk's LUKS header: .*damaged or was tampered with.*carryon rollback.*Invalid password, cannot unlock any keyslot/),
  );
});

test('a real lock conflict (qemu-io holds the image) is disk-busy, through a tool and through QMP; a wrong key through QMP is disk-key-refused', async () => {
  const holder = spawn('qemu-io', ['--object', `secret,id=s0,data=${SECRET}`, '--image-opts', imageOpts('s0')], { stdio: ['pipe', 'pipe', 'pipe'] });
  let said = '';
  holder.stdout.setEncoding('utf8').on('data', (d: string) => (said += d));
  holder.stdin.write('info\n');
  for (let i = 0; i < 100 && !/cluster size/i.test(said); i++) await new Promise((r) => setTimeout(r, 50));
  assert.match(said, /cluster size/i, 'qemu-io holds the image open');
  const qsd = await StorageDaemon.start(join(dir, 'qsd'));
  try {
    await assert.rejects(runQemuTool('qemu-img', ['map', '--output=json', '--object', SECRET_FD_OBJECT('s0'), '--image-opts', imageOpts('s0')], { secret: SECRET }), is('disk-busy', /in use by another carryon process.*Failed to get shared "write" lock/));
    const node = (name: string, secretId: string) => ({ driver: 'qcow2', 'node-name': name, file: { driver: 'file', filename: image }, encrypt: { format: 'luks', 'key-secret': secretId } });
    await assert.rejects(addLayer(qsd, node('n1', 'k1'), 'k1', SECRET), is('disk-busy', /in use by another carryon process.*lock/));
    holder.stdin.end('quit\n');
    await new Promise((r) => holder.once('exit', r));
    await assert.rejects(addLayer(qsd, node('n2', 'k2'), 'k2', 'a-damaged-key'), is('disk-key-refused', /does not open the disk's LUKS header.*QEMU: .*Invalid password/));
  } finally {
    holder.kill('SIGKILL');
    await qsd.stop(5000);
  }
});

/** A /proc file of `pid`, or '' once that process is gone (it may exit between listing and reading). */
function procFile(pid: number, file: string): string {
  try {
    return readFileSync(`/proc/${pid}/${file}`, 'utf8');
  } catch {
    return '';
  }
}

/** Pids whose parent is `ppid` (from /proc). */
function childrenOf(ppid: number): number[] {
  return readdirSync('/proc').filter((p) => /^\d+$/.test(p)).map(Number).filter((pid) => {
    try {
      const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
      return Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[1]) === ppid;
    } catch {
      return false;
    }
  });
}

test('a qemu-img whose parent is killed -9 before handing over the secret does not wait on its FIFO forever', async () => {
  // The tool opens its FIFO a second late (a slow start), after its parent is gone: with no
  // writer ever coming, open() would block for good.
  const slow = join(dir, 'slow-qemu-img');
  writeFileSync(slow, '#!/bin/sh\nsleep 1\nexec qemu-img "$@"\n');
  chmodSync(slow, 0o755);
  const script = join(dir, 'parent.mjs');
  const tools = new URL('../../src/qemu/qemu-tools.js', import.meta.url).href;
  writeFileSync(script, `import { runQemuTool, SECRET_FD_OBJECT } from ${JSON.stringify(tools)};
await runQemuTool(${JSON.stringify(slow)}, ['map', '--object', SECRET_FD_OBJECT('s0'), '--image-opts', ${JSON.stringify(imageOpts('s0'))}], { secret: 'x' });
`);
  const parent = spawn(process.execPath, [script], { stdio: 'ignore' });
  let tool: number[] = [];
  for (let i = 0; i < 100 && tool.length === 0; i++) {
    await new Promise((r) => setTimeout(r, 20));
    tool = childrenOf(parent.pid!).filter((pid) => /slow-qemu-img|qemu-img|setpriv/.test(procFile(pid, 'cmdline')));
  }
  assert.equal(tool.length, 1, 'the tool started');
  parent.kill('SIGKILL');
  const alive = () => tool.filter((pid) => { const stat = procFile(pid, 'stat'); return stat !== '' && !/^\S+ \(\S+\) Z/.test(stat); });
  for (let i = 0; i < 60 && alive().length; i++) await new Promise((r) => setTimeout(r, 50));
  const left = alive();
  for (const pid of left) process.kill(pid, 'SIGKILL');
  assert.deepEqual(left, [], 'the tool went with its parent');
});
