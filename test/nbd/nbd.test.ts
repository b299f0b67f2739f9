import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { chmodSync, chownSync, mkdirSync, mkdtempSync, readFileSync, rmSync, statSync, symlinkSync, writeFileSync } from 'node:fs';
import { connect } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { after, test } from 'node:test';
import { serveNbd } from '../../src/nbd/server.js';
import { NbdClient } from '../../src/nbd/client.js';
import { MemoryDevice } from '../support/memory-device.js';

const run = promisify(execFile);
const dir = mkdtempSync(join(tmpdir(), 'carryon-nbd-'));
after(() => rmSync(dir, { recursive: true, force: true }));
const SIZE = 8 * 1024 * 1024;

async function setup(name: string) {
  const image = join(dir, `${name}.raw`);
  const data = Buffer.alloc(SIZE);
  randomBytes(SIZE / 2).copy(data, 0);
  writeFileSync(image, data);
  const disk = new MemoryDevice(Buffer.from(data));
  const socketPath = join(dir, `${name}-sock`, 'nbd.sock');
  const server = await serveNbd(new Map([['disk0', disk]]), { socketPath });
  return { image, data, disk, socketPath, server, uri: `nbd+unix:///disk0?socket=${socketPath}` };
}

test('qemu-img, qemu-io, nbdinfo and nbdcopy agree with the expected image', async () => {
  const s = await setup('peers');
  try {
    assert.equal(statSync(s.socketPath).mode & 0o777, 0o600);
    const info = JSON.parse((await run('qemu-img', ['info', '--output=json', s.uri])).stdout) as { 'virtual-size': number };
    assert.equal(info['virtual-size'], SIZE);
    assert.match((await run('nbdinfo', ['--list', `nbd+unix:///?socket=${s.socketPath}`])).stdout, /disk0/);
    // Writes through qemu-io (unaligned, across a chunk boundary, zeroes, discard) …
    await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0xab 1000 300k', '-c', 'write -z 5M 512k', '-c', 'discard 6M 256k', '-c', 'flush', s.uri]);
    s.data.fill(0xab, 1000, 1000 + 300 * 1024);
    s.data.fill(0, 5 * 1024 * 1024, 5 * 1024 * 1024 + 512 * 1024);
    s.data.fill(0, 6 * 1024 * 1024, 6 * 1024 * 1024 + 256 * 1024);
    // … read back by qemu-io and by nbdcopy, and compared by qemu-img.
    await run('qemu-io', ['-f', 'raw', '-c', 'read -P 0xab 1000 300k', s.uri]);
    const copy = join(dir, 'copy.raw');
    await run('nbdcopy', [s.uri, copy]);
    assert.ok(readFileSync(copy).equals(s.data));
    const expected = join(dir, 'expected.raw');
    writeFileSync(expected, s.data);
    await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', expected, s.uri]);
    // nbdcopy as writer, qemu-img as reader.
    const fresh = join(dir, 'fresh.raw');
    writeFileSync(fresh, randomBytes(SIZE));
    await run('nbdcopy', [fresh, s.uri]);
    await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', fresh, s.uri]);
    assert.ok(s.disk.flushes > 0, 'flushes reach the device');
  } finally {
    await s.server.close();
    await s.disk.close();
  }
});

test('our NBD client reads and writes what qemu-io sees, pipelined, and refuses ranges past the end', async () => {
  const s = await setup('client');
  try {
    const c = await NbdClient.connect(s.socketPath, 'disk0');
    assert.equal(c.size, SIZE);
    const parts = await Promise.all([0, 1, 2, 3].map((i) => c.read(i * 65536, 65536)));
    assert.ok(Buffer.concat(parts).equals(s.data.subarray(0, 4 * 65536)));
    await c.write(4096, Buffer.alloc(8192, 0x5a));
    await c.flush();
    await run('qemu-io', ['-f', 'raw', '-c', 'read -P 0x5a 4096 8k', s.uri]);
    await assert.rejects(c.read(SIZE - 10, 100), /outside/);
    await c.close();
    await assert.rejects(NbdClient.connect(s.socketPath, 'nope'), /refused export/);
  } finally {
    await s.server.close();
  }
});

test('malformed handshakes, unknown options, reads past the end and oversize requests get errors, not crashes', async () => {
  const s = await setup('bad');
  try {
    const talk = (bytes: Buffer[], wait = 300) =>
      new Promise<Buffer>((resolve) => {
        const sock = connect(s.socketPath);
        const got: Buffer[] = [];
        sock.on('data', (d) => got.push(d));
        sock.on('connect', () => bytes.forEach((b) => sock.write(b)));
        const done = () => resolve(Buffer.concat(got));
        sock.on('close', done);
        setTimeout(() => { sock.destroy(); done(); }, wait);
      });
    const flags = Buffer.from([0, 0, 0, 3]);
    const opt = (o: number, data = Buffer.alloc(0)) => { const b = Buffer.alloc(16 + data.length); b.write('IHAVEOPT', 0, 'latin1'); b.writeUInt32BE(o, 8); b.writeUInt32BE(data.length, 12); data.copy(b, 16); return b; };
    // Garbage instead of option magic: the server closes this connection.
    const g = await talk([flags, Buffer.from('garbage-garbage-garbage')]);
    assert.equal(g.subarray(0, 8).toString('latin1'), 'NBDMAGIC');
    // Unknown option → ERR_UNSUP (0x80000001).
    const u = await talk([flags, opt(99)]);
    assert.equal(u.readUInt32BE(18 + 12), 0x80000001);
    // Unknown export via GO → ERR_UNKNOWN.
    const name = Buffer.from('nope');
    const goData = Buffer.alloc(4 + name.length + 2); goData.writeUInt32BE(name.length, 0); name.copy(goData, 4);
    const gu = await talk([flags, opt(7, goData)]);
    assert.equal(gu.readUInt32BE(18 + 12), 0x80000006);
    // Read past the end → EINVAL; oversize read → EINVAL; the server is still alive afterwards.
    const nm = Buffer.from('disk0');
    const ok = Buffer.alloc(4 + nm.length + 2); ok.writeUInt32BE(nm.length, 0); nm.copy(ok, 4);
    const req = (type: number, offset: number, length: number, handle: number) => { const b = Buffer.alloc(28); b.writeUInt32BE(0x25609513, 0); b.writeUInt16BE(type, 6); b.writeUInt32BE(handle, 12); b.writeBigUInt64BE(BigInt(offset), 16); b.writeUInt32BE(length, 24); return b; };
    const r = await talk([flags, opt(7, ok), req(0, SIZE - 10, 100, 1), req(0, 0, 64 * 1024 * 1024, 2), req(0, 0, 16, 3)], 500);
    const replies = r.subarray(r.length - (16 * 3 + 16));
    assert.equal(replies.readUInt32BE(4), 22);
    assert.equal(replies.readUInt32BE(16 + 4), 22);
    assert.equal(replies.readUInt32BE(32 + 4), 0);
    // A client that disconnects mid-write loses only that write.
    const w = req(1, 0, 65536, 4);
    await talk([flags, opt(7, ok), w, Buffer.alloc(1000, 0x77)], 200);
    await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', s.image, s.uri]);
  } finally {
    await s.server.close();
    await s.disk.close();
  }
});

test('socket directory (issue 22): an existing loose one is tightened to 0700 before listen; a symlink or another user\'s is refused', async () => {
  const open = join(dir, 'open');
  mkdirSync(open, { mode: 0o755 });
  chmodSync(open, 0o755);
  const loose = join(open, 'loose');
  mkdirSync(loose);
  chmodSync(loose, 0o777);
  const disk = new MemoryDevice(Buffer.alloc(4096));
  const server = await serveNbd(new Map([['disk0', disk]]), { socketPath: join(loose, 'nbd.sock') });
  try {
    assert.equal(statSync(loose).mode & 0o777, 0o700, 'the directory is tightened');
    assert.equal(statSync(join(loose, 'nbd.sock')).mode & 0o777, 0o600);
    // Another user cannot reach the socket (run where this test may switch users: as root).
    if (process.getuid?.() === 0) {
      const probe = `require('net').connect(${JSON.stringify(join(loose, 'nbd.sock'))}).on('connect', () => { console.log('connected'); process.exit(0); }).on('error', (e) => { console.log(e.code); process.exit(0); })`;
      const { stdout } = await run('setpriv', ['--reuid=65534', '--regid=65534', '--clear-groups', process.execPath, '-e', probe]);
      assert.equal(stdout.trim(), 'EACCES');
    }
  } finally {
    await server.close();
  }
  const target = join(dir, 'elsewhere');
  mkdirSync(target, { mode: 0o700 });
  symlinkSync(target, join(open, 'link'));
  await assert.rejects(serveNbd(new Map([['disk0', disk]]), { socketPath: join(open, 'link', 'nbd.sock') }), (err: Error & { code?: string }) => err.code === 'unsafe-socket-dir' && /not a directory of its own/.test(err.message));
  if (process.getuid?.() === 0) {
    const foreign = join(open, 'foreign');
    mkdirSync(foreign, { mode: 0o700 });
    chownSync(foreign, 65534, 65534);
    await assert.rejects(serveNbd(new Map([['disk0', disk]]), { socketPath: join(foreign, 'nbd.sock') }), /belongs to user 65534, not this user/);
    assert.equal(statSync(foreign).mode & 0o777, 0o700, 'left as it was');
  }
});
