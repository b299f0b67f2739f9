import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { after, test } from 'node:test';
import { VaultDisk } from '../../src/disk/vault-disk.js';
import { serveNbd } from '../../src/nbd/server.js';
import { PackChunkStore } from '../../src/store/pack-chunk-store.js';
import { importRaw, makeImage } from '../disk/fixtures.js';

const run = promisify(execFile);
const dir = mkdtempSync(join(tmpdir(), 'carryon-nbd-stream-'));
after(() => rmSync(dir, { recursive: true, force: true }));
const CS = 64 * 1024;

test('nbdcopy of the whole export while only 10% of the chunks are local is byte-identical', async () => {
  const img = makeImage(6 * 1024 * 1024, CS);
  const server = await PackChunkStore.open(join(dir, 'server'));
  const { keys, manifest } = await importRaw(server, img, CS);
  const ids = manifest.chunks.filter((c): c is string => c !== null);
  const local = await PackChunkStore.open(join(dir, 'laptop'));
  for (const id of ids.slice(0, Math.ceil(ids.length / 10))) await local.put(id, (await server.get(id))!);
  const onDemand = new Set<number>();
  const copyOne = async (id: string) => {
    await new Promise((r) => setTimeout(r, 2)); // the wire
    await local.put(id, (await server.get(id))!);
  };
  const disk = await VaultDisk.open({
    stateDir: join(dir, 'state'), store: local, keys, base: manifest, autoFlushMs: 0,
    fetchChunk: async (id, index) => {
      onDemand.add(index);
      await copyOne(id);
    },
  });
  assert.ok((await disk.percentLocal()) < 15);
  const socketPath = join(dir, 'sock', 'nbd.sock');
  const nbd = await serveNbd(new Map([['disk0', disk]]), { socketPath });
  // The background fill runs meanwhile, from the far end of the disk backwards.
  let stopFill = false;
  const fill = (async () => {
    for (const id of [...ids].reverse()) {
      if (stopFill) return;
      if (!(await local.has(id))) await copyOne(id);
    }
  })();
  try {
    const out = join(dir, 'copy.raw');
    await run('nbdcopy', [`nbd+unix:///disk0?socket=${socketPath}`, out]);
    assert.ok(readFileSync(out).equals(img), 'byte-identical');
    assert.ok(onDemand.size > 0, 'some chunks were fetched on demand, ahead of the fill');
  } finally {
    stopFill = true;
    await fill;
    await nbd.close();
    await disk.close();
  }
  assert.equal(await disk.percentLocal(), 100);
});

test('several exports by name on one socket; TCP on 127.0.0.1 only when asked', async () => {
  const disks = new Map<string, VaultDisk>();
  const images: Record<string, Buffer> = {};
  for (const name of ['system', 'data']) {
    const store = await PackChunkStore.open(join(dir, `store-${name}`));
    const img = makeImage(1024 * 1024 + (name === 'data' ? CS : 0), CS);
    const { keys, manifest } = await importRaw(store, img, CS);
    images[name] = img;
    disks.set(name, await VaultDisk.open({ stateDir: join(dir, `state-${name}`), store, keys, base: manifest, autoFlushMs: 0 }));
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
