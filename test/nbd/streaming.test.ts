import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { after, test } from 'node:test';
import { serveNbd } from '../../src/nbd/server.js';
import { makeImage } from '../disk/fixtures.js';
import { MemoryDevice } from '../support/memory-device.js';

const run = promisify(execFile);
const dir = mkdtempSync(join(tmpdir(), 'carryon-nbd-stream-'));
after(() => rmSync(dir, { recursive: true, force: true }));
const CS = 64 * 1024;

test('several exports by name on one socket; TCP on 127.0.0.1 only when asked', async () => {
  const disks = new Map<string, MemoryDevice>();
  const images: Record<string, Buffer> = {};
  for (const name of ['system', 'data']) {
    const img = makeImage(1024 * 1024 + (name === 'data' ? CS : 0), CS);
    images[name] = img;
    disks.set(name, new MemoryDevice(Buffer.from(img)));
  }
  const socketPath = join(dir, 'multi', 'nbd.sock');
  const unix = await serveNbd(disks, { socketPath });
  const tcp = await serveNbd(disks, { tcpPort: 0 });
  try {
    assert.match(tcp.address, /^127\.0\.0\.1:\d+$/);
    const list = (await run('nbdinfo', ['--list', '--json', `nbd+unix:///?socket=${socketPath}`])).stdout;
    const names = (JSON.parse(list) as { exports: { 'export-name': string }[] }).exports.map((e) => e['export-name']).sort();
    assert.deepEqual(names, ['data', 'system']);
    for (const [name, img] of Object.entries(images)) {
      const expected = join(dir, `${name}.raw`);
      writeFileSync(expected, img);
      await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', expected, `nbd+unix:///${name}?socket=${socketPath}`]);
      const size = (await run('nbdinfo', ['--size', `nbd://${tcp.address}/${name}`])).stdout.trim();
      assert.equal(Number(size), img.length);
    }
  } finally {
    await tcp.close();
    await unix.close();
    for (const d of disks.values()) await d.close();
  }
});
