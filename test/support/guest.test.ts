import assert from 'node:assert/strict';
import { execFile, execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync, readFileSync } from 'node:fs';
import { mkdir, mkdtemp, readFile, readlink, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, test, type TestContext } from 'node:test';
import { promisify } from 'node:util';
import { gunzipSync } from 'node:zlib';
import { createLuksQcow2, luksQcow2ToRaw } from '../../bench/disk.js';
import {
  bootGuest,
  buildInitramfs,
  checkExt4Image,
  GUEST_AGENT_BINARY,
  guestAppend,
  guestKernel,
  kernelRelease,
  lastDurableRecord,
  makeExt4Image,
  newcArchive,
  parseGuestSerial,
  readExt4File,
  resolveModules,
  S_IFCHR,
  S_IFDIR,
  S_IFLNK,
  S_IFREG,
  sharedLibraries,
  verifyWriterRecords,
  virtioDiskArgs,
  WRITER_RECORD_BYTES,
  writerRecord,
  writerRecordsInImage,
} from './guest.js';

const run = promisify(execFile);

async function withDir(fn: (dir: string) => Promise<void>): Promise<void> {
  const dir = await mkdtemp(join(tmpdir(), 'carryon-guest-test-'));
  try {
    await fn(dir);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

/** Extracts a cpio archive with busybox (an independent reader of the format) into `dir`. */
async function extract(archive: Buffer, dir: string, patterns: string[] = []): Promise<void> {
  await mkdir(dir, { recursive: true });
  const file = join(dir, '..', 'archive.cpio');
  await writeFile(file, archive);
  await run('busybox', ['cpio', '-i', '-d', '-F', file, ...patterns], { cwd: dir });
}

describe('newc cpio', () => {
  test('busybox cpio lists and extracts what we write', async () => {
    await withDir(async (dir) => {
      const odd = Buffer.from([0, 1, 2, 3, 255]); // lengths not a multiple of 4 exercise the padding
      const archive = newcArchive([
        { name: 'bin', mode: S_IFDIR | 0o755 },
        { name: 'bin/tool', mode: S_IFREG | 0o755, data: Buffer.from('#!/bin/sh\necho hi\n') },
        { name: 'bin/sh', mode: S_IFLNK | 0o777, data: Buffer.from('tool') },
        { name: 'data.bin', mode: S_IFREG | 0o644, data: odd },
        { name: 'empty', mode: S_IFREG | 0o600 },
        { name: 'console', mode: S_IFCHR | 0o600, rdev: { major: 5, minor: 1 } },
      ]);
      assert.equal(archive.length % 4, 0);
      await writeFile(join(dir, 'a.cpio'), archive);
      const { stdout } = await run('busybox', ['cpio', '-t', '-v', '-F', join(dir, 'a.cpio')]);
      const lines = stdout.trim().split('\n');
      assert.equal(lines.length, 6);
      assert.match(lines[0]!, /^d.* bin$/);
      assert.match(lines[2]!, /^l.* bin\/sh -> tool$/);
      assert.match(lines[5]!, /^c.* console$/);
      // busybox does not print device numbers: read rdevmajor/rdevminor from the last header
      const at = archive.lastIndexOf('console\0') - 110;
      assert.equal(archive.toString('ascii', at + 6 + 9 * 8, at + 6 + 11 * 8), '0000000500000001');

      // extract everything but the device node (mknod needs root)
      await extract(archive, join(dir, 'x'), ['bin', 'bin/*', 'data.bin', 'empty']);
      assert.equal(await readFile(join(dir, 'x/bin/tool'), 'utf8'), '#!/bin/sh\necho hi\n');
      assert.equal(await readlink(join(dir, 'x/bin/sh')), 'tool');
      assert.deepEqual(await readFile(join(dir, 'x/data.bin')), odd);
      assert.equal((await readFile(join(dir, 'x/empty'))).length, 0);
    });
  });

  test('refuses absolute names', () => {
    assert.throws(() => newcArchive([{ name: '/init', mode: S_IFREG | 0o755 }]), /relative/);
  });
});

describe('kernel modules', () => {
  /** A fake /lib/modules/<release> with compressed modules, a softdep through an alias and a builtin. */
  async function fakeTree(root: string): Promise<string> {
    const dir = join(root, '9.9.9-test');
    await mkdir(join(dir, 'kernel'), { recursive: true });
    const mk = async (name: string, how: 'plain' | 'xz' | 'zst') => {
      const plain = join(dir, 'kernel', `${name}.ko`);
      await writeFile(plain, `module ${name}\n`);
      if (how === 'xz') execFileSync('xz', ['-f', plain]) // replaces the file, as gzip does;
      if (how === 'zst') execFileSync('zstd', ['--rm', '-q', '-f', plain]);
      return `kernel/${name}.ko${how === 'plain' ? '' : how === 'xz' ? '.xz' : '.zst'}`;
    };
    const ring = await mk('virtio_ring', 'xz');
    const virtio = await mk('virtio', 'zst');
    const pci = await mk('virtio_pci', 'plain');
    const blk = await mk('virtio_blk', 'xz');
    const jbd2 = await mk('jbd2', 'plain');
    const ext4 = await mk('ext4', 'xz');
    const crc = await mk('crc32c-generic', 'plain');
    const con = await mk('virtio_console', 'plain');
    const button = await mk('button', 'plain');
    const evdev = await mk('evdev', 'plain');
    await writeFile(
      join(dir, 'modules.dep'),
      [`${ring}:`, `${virtio}: ${ring}`, `${pci}: ${virtio} ${ring}`, `${blk}: ${virtio} ${ring}`, `${jbd2}:`, `${ext4}: ${jbd2}`, `${crc}:`, `${con}: ${virtio} ${ring}`, `${button}:`, `${evdev}:`, ''].join('\n'),
    );
    await writeFile(join(dir, 'modules.softdep'), 'softdep ext4 pre: crypto-crc32c\nsoftdep jbd2 pre: crypto-crc32c\n');
    await writeFile(join(dir, 'modules.alias'), 'alias crypto-crc32c crc32c_generic\nalias crc32c crc32c_generic\n');
    await writeFile(join(dir, 'modules.builtin'), 'kernel/lib/crc16.ko\nkernel/fs/mbcache.ko\n');
    return dir;
  }

  test('dependencies come first, softdeps through aliases, builtins skipped, unknown modules named', async () => {
    await withDir(async (root) => {
      const dir = await fakeTree(root);
      const mods = resolveModules(dir, ['virtio_pci', 'virtio_blk', 'ext4', 'crc16']);
      assert.deepEqual(
        mods.map((m) => `${m.name}${m.optional ? '?' : ''}`),
        ['virtio_ring', 'virtio', 'virtio_pci', 'virtio_blk', 'crc32c_generic?', 'jbd2', 'ext4'],
      );
      assert.throws(() => resolveModules(dir, ['nvme']), /nvme/);
    });
  });

  test('the initramfs holds busybox, /init and decompressed modules', async () => {
    await withDir(async (root) => {
      await fakeTree(root);
      const out = await buildInitramfs(join(root, 'out'), { kernelRelease: '9.9.9-test', modulesRoot: root });
      const cpio = gunzipSync(await readFile(out));
      await extract(cpio, join(root, 'x'), ['init', 'bin/*', 'lib/modules/*']);
      assert.equal(await readFile(join(root, 'x/lib/modules/ext4.ko'), 'utf8'), 'module ext4\n');
      assert.equal(await readFile(join(root, 'x/lib/modules/virtio.ko'), 'utf8'), 'module virtio\n');
      assert.equal(await readFile(join(root, 'x/lib/modules/crc32c_generic.ko'), 'utf8'), 'module crc32c-generic\n');
      const init = await readFile(join(root, 'x/init'), 'utf8');
      const order = [...init.matchAll(/insmod \/lib\/modules\/(\w+)\.ko/g)].map((m) => m[1]);
      assert.deepEqual(order, ['virtio_ring', 'virtio', 'virtio_pci', 'virtio_blk', 'crc32c_generic', 'jbd2', 'ext4']);
      assert.deepEqual(await readFile(join(root, 'x/bin/busybox')), readFileSync('/bin/busybox'));
    });
  });

  test('with the guest agent: qemu-ga runs from the initramfs alone, /init starts it on its port, /sbin/shutdown stops the writer', async (t) => {
    if (!existsSync(GUEST_AGENT_BINARY)) return t.skip('qemu-guest-agent is not installed (scripts/install-deps installs it)');
    await withDir(async (root) => {
      await fakeTree(root);
      const out = await buildInitramfs(join(root, 'out'), { kernelRelease: '9.9.9-test', modulesRoot: root, guestAgent: true, powerButton: true });
      const x = join(root, 'x');
      await extract(gunzipSync(await readFile(out)), x);
      const init = await readFile(join(x, 'init'), 'utf8');
      assert.match(init, /insmod \/lib\/modules\/virtio_console\.ko/);
      assert.match(init, /insmod \/lib\/modules\/button\.ko[^]*insmod \/lib\/modules\/evdev\.ko/);
      assert.match(init, /dd if="\$pwr" of=\/dev\/null bs=24 count=1 2>\/dev\/null && touch \/tmp\/carryon-stop/, 'a power-button press stops the writer');
      assert.match(init, /\/usr\/sbin\/qemu-ga -m virtio-serial -p "\$port"/);
      assert.ok(init.indexOf('qemu-ga -m') > init.indexOf('mount -t "$fstype"') && init.indexOf('qemu-ga -m') < init.indexOf('carryon.writer=*)'), 'started after the mount, before the work');
      for (const lib of await sharedLibraries(GUEST_AGENT_BINARY)) assert.ok(existsSync(join(x, lib)), `${lib} is in the initramfs`);
      assert.match(await readFile(join(x, 'sbin/shutdown'), 'utf8'), /touch \/tmp\/carryon-stop/);
      if (process.getuid?.() !== 0) return t.diagnostic('not root: the chroot check of qemu-ga is skipped');
      // The initramfs alone runs it: no library is missing.
      const { stdout } = await run('chroot', [x, '/bin/busybox', 'env', 'LD_LIBRARY_PATH=/lib/x86_64-linux-gnu', '/usr/sbin/qemu-ga', '--version']);
      assert.match(stdout, /QEMU Guest Agent/);
    });
  });

  test("this machine's kernel has what the guest needs", (t) => {
    let kernel: string;
    try {
      kernel = guestKernel();
    } catch (e) {
      t.skip((e as Error).message);
      return;
    }
    const names = resolveModules(join('/lib/modules', kernelRelease(kernel))).map((m) => m.name);
    for (const n of ['virtio_pci', 'virtio_blk', 'jbd2', 'ext4']) assert.ok(names.includes(n), n);
    assert.ok(names.indexOf('virtio_blk') > names.indexOf('virtio_ring'));
    t.diagnostic(`${kernel}: ${names.join(' ')}`);
  });
});

describe('guest command line and serial', () => {
  test('actions become kernel words; unsafe text goes as base64', () => {
    assert.equal(
      guestAppend([{ write: '/a/b.txt', content: 'plain-text' }, { write: '/c', content: 'two words\n' }, { read: '/a/b.txt' }, { sha256: '/c' }]),
      `carryon.write=/a/b.txt:plain-text carryon.write64=/c:${Buffer.from('two words\n').toString('base64')} carryon.read=/a/b.txt carryon.sha256=/c`,
    );
    assert.equal(guestAppend([{ writer: '/log/rec' }, { writer: '/r2', perSync: 1 }]), 'carryon.writer=/log/rec:4 carryon.writer=/r2:1');
    assert.throws(() => guestAppend([{ read: 'relative' }]), /absolute/);
    assert.throws(() => guestAppend([{ read: '/a b' }]), /spaces/);
  });

  test('markers are found among kernel messages and CRLFs', () => {
    const b64 = Buffer.from('x'.repeat(100)).toString('base64');
    const serial = [
      '[    1.0] something',
      'CARRYON-GUEST-INIT uptime=2.50',
      'CARRYON-READ-BEGIN /f',
      b64.slice(0, 76),
      '[    2.1] EXT4-fs (vda): a kernel line in the middle',
      b64.slice(76),
      'CARRYON-READ-END /f',
      `CARRYON-SHA256 ${'ab'.repeat(32)} /f`,
      'CARRYON-GUEST-DONE rc=0 uptime=3.25',
    ].join('\r\n');
    const r = parseGuestSerial(serial);
    assert.equal(r.done, true);
    assert.equal(r.reads.get('/f')?.toString(), 'x'.repeat(100));
    assert.equal(r.sha256.get('/f'), 'ab'.repeat(32));
    assert.equal(r.uptimeAtInit, 2.5);
    assert.equal(r.uptimeAtDone, 3.25);
    const bad = parseGuestSerial('CARRYON-GUEST-FAIL mount /dev/vda as ext4\r\n');
    assert.equal(bad.done, false);
    assert.equal(bad.failure, 'mount /dev/vda as ext4');
  });
});

describe('the writer and its records', () => {
  test("the guest's printf writes exactly the records the host checks", async () => {
    await withDir(async (dir) => {
      const init = await readFile(await buildInitramfs(join(dir, 'out'), { guestAgent: false }).then(async (f) => {
        await extract(gunzipSync(await readFile(f)), join(dir, 'x'), ['init']);
        return join(dir, 'x', 'init');
      }), 'utf8');
      const line = /^\s*(printf 'CARRYON-REC .*) >&3 \|\|/m.exec(init)?.[1];
      assert.ok(line, 'the writer has its printf');
      const file = join(dir, 'rec');
      await run('busybox', ['sh', '-c', `exec 3>${file}; for n in 1 2 3 4 5 99999; do ${line} >&3; done`]);
      const data = await readFile(file);
      assert.equal(data.length, 6 * WRITER_RECORD_BYTES);
      assert.deepEqual(verifyWriterRecords(data.subarray(0, 5 * WRITER_RECORD_BYTES)), { count: 5, tornBytes: 0 });
      assert.equal(data.subarray(5 * WRITER_RECORD_BYTES).toString('latin1'), writerRecord(99999));
    });
  });

  test('a clean prefix counts; a torn last record is told apart from damage', () => {
    const recs = (a: number, b: number) => Buffer.from(Array.from({ length: b - a + 1 }, (_, i) => writerRecord(a + i)).join(''), 'latin1');
    assert.equal(writerRecord(1).length, WRITER_RECORD_BYTES);
    assert.deepEqual(verifyWriterRecords(Buffer.alloc(0)), { count: 0, tornBytes: 0 });
    assert.deepEqual(verifyWriterRecords(recs(1, 40)), { count: 40, tornBytes: 0 });
    // a crash mid-append: part of record 41, or its space zeroed
    assert.deepEqual(verifyWriterRecords(Buffer.concat([recs(1, 40), recs(41, 41).subarray(0, 20)])), { count: 40, tornBytes: 20 });
    assert.deepEqual(verifyWriterRecords(Buffer.concat([recs(1, 40), Buffer.alloc(4096)])), { count: 40, tornBytes: 4096 });
    // a lost record, a damaged byte, records out of order, a stale record after zeros: damage
    assert.throws(() => verifyWriterRecords(Buffer.concat([recs(1, 10), recs(12, 20)])), /10 good, then damage at byte 661 \(record 11\)/);
    const flipped = recs(1, 20);
    flipped[5 * WRITER_RECORD_BYTES + 30]! ^= 1;
    assert.throws(() => verifyWriterRecords(flipped), /5 good/);
    assert.throws(() => verifyWriterRecords(Buffer.concat([recs(1, 3), Buffer.alloc(64), recs(5, 5)])), /3 good/);
  });

  test('an image checks clean as it is, or after a journal replay on a copy; damage shows; records are read the same way', async () => {
    await withDir(async (dir) => {
      const records = Buffer.from([1, 2, 3].map(writerRecord).join(''), 'latin1');
      const img = join(dir, 'fs.raw');
      await makeExt4Image(img, 16, { 'log/rec': records });
      assert.deepEqual(await writerRecordsInImage(img, '/log/rec'), { count: 3, tornBytes: 0 });
      const plain = await checkExt4Image(img);
      assert.deepEqual([plain.clean, plain.journalReplayed], [true, false]);
      // As if taken from a mounted file system without a freeze: a replay is due.
      await run('debugfs', ['-w', '-R', 'feature needs_recovery', img]);
      const before = await readFile(img);
      const replayed = await checkExt4Image(img);
      assert.deepEqual([replayed.clean, replayed.journalReplayed], [true, true]);
      assert.deepEqual(await writerRecordsInImage(img, '/log/rec'), { count: 3, tornBytes: 0 });
      assert.ok(before.equals(await readFile(img)), 'the image itself is never changed');
      await run('debugfs', ['-w', '-R', 'feature ^needs_recovery', img]);
      await run('debugfs', ['-w', '-R', 'clri <2>', img]); // the root directory's inode wiped
      const damaged = await checkExt4Image(img);
      assert.equal(damaged.clean, false);
      assert.match(damaged.output, /root inode|Root inode/i);
    });
  });

  test('serial: the last durable record, the writer stop, the agent start', () => {
    const serial = 'CARRYON-QGA-STARTED /dev/vport1p1\r\nCARRYON-WRITER-START /rec\r\nCARRYON-REC 4\r\n[ 3.1] kernel\r\nCARRYON-REC 8\r\nCARRYON-REC 12\r\nCARRYON-POWER-BUTTON\r\nCARRYON-WRITER-STOP 12\r\n';
    const r = parseGuestSerial(serial);
    assert.deepEqual([r.agentStarted, r.durableRecords, r.writerStopped, r.powerButton], [true, 12, 12, true]);
    assert.equal(parseGuestSerial('CARRYON-REC 3\n').powerButton, false);
    assert.equal(lastDurableRecord(serial), 12);
    assert.equal(lastDurableRecord(serial.slice(0, serial.indexOf('CARRYON-REC 12'))), 8, 'what the serial said up to a moment');
  });
});

describe('booting the guest (QEMU, TCG)', () => {
  /** Skips where the machine lacks the guest's packages (scripts/install-deps installs them). */
  function kernelOrSkip(t: TestContext): string | null {
    try {
      execFileSync('qemu-system-x86_64', ['--version'], { stdio: 'ignore' });
      return guestKernel();
    } catch (e) {
      t.skip(`cannot boot a guest here: ${(e as Error).message}`);
      return null;
    }
  }

  // One boot covers the disk paths the tests use (each TCG boot costs ≈ 15 s): a LUKS qcow2 (so qcow2 too),
  // files the host put there read back, new files and a 2 MiB fill written, all checked from the host.
  test('on a LUKS-encrypted qcow2 (secret through a FIFO): the guest reads what the host wrote, writes files the host decrypts and finds, sha256 matches', async (t) => {
    const kernel = kernelOrSkip(t);
    if (!kernel) return;
    await withDir(async (dir) => {
      const raw = join(dir, 'disk.raw');
      const enc = join(dir, 'disk.qcow2');
      await makeExt4Image(raw, 64, { 'etc/motd': 'encrypted at rest\n', 'data/blob.bin': Buffer.from([0, 10, 13, 255]) });
      const secret = randomBytes(32).toString('hex');
      await createLuksQcow2(raw, enc, { secret });
      await rm(raw);
      const initrd = await buildInitramfs(dir, { kernelRelease: kernelRelease(kernel) });
      const boot = await bootGuest({
        kernel,
        initrd,
        diskArgs: virtioDiskArgs(enc, 'qcow2', { keySecret: 'disk0-key' }),
        secrets: { 'disk0-key': secret },
        actions: [
          { write: '/home/user/note.txt', content: 'written by the guest' },
          { write: '/home/user/multi.txt', content: 'two lines\nand spaces\n' },
          { read: '/etc/motd' },
          { read: '/data/blob.bin' },
          { fill: '/big.bin', mib: 2 },
          { sha256: '/big.bin' },
        ],
      });
      t.diagnostic(`LUKS qcow2 boot: ${boot.seconds.toFixed(1)} s wall, /init at ${boot.uptimeAtInit} s and done at ${boot.uptimeAtDone} s guest uptime`);
      assert.equal(boot.reads.get('/etc/motd')?.toString(), 'encrypted at rest\n');
      assert.deepEqual(boot.reads.get('/data/blob.bin'), Buffer.from([0, 10, 13, 255]));
      await luksQcow2ToRaw(enc, raw, secret);
      assert.equal((await readExt4File(raw, '/home/user/note.txt')).toString(), 'written by the guest');
      assert.equal((await readExt4File(raw, '/home/user/multi.txt')).toString(), 'two lines\nand spaces\n');
      const { createHash } = await import('node:crypto');
      const big = await readExt4File(raw, '/big.bin');
      assert.equal(big.length, 2 * 2 ** 20);
      assert.equal(boot.sha256.get('/big.bin'), createHash('sha256').update(big).digest('hex'));
      await run('e2fsck', ['-f', '-n', raw]); // the guest unmounted cleanly: no errors
      await assert.rejects(readExt4File(raw, '/nope'), /not found/i);
      const wrong = await bootGuest({ kernel, diskArgs: virtioDiskArgs(enc, 'qcow2', { keySecret: 'k' }), secrets: { k: 'wrong' }, allowFailure: true });
      assert.equal(wrong.done, false);
      assert.equal(wrong.serial.includes('CARRYON-GUEST-INIT'), false); // QEMU refused to start
    });
  });

  test('a failing action is reported by the guest, which still powers off', async (t) => {
    const kernel = kernelOrSkip(t);
    if (!kernel) return;
    await withDir(async (dir) => {
      const disk = join(dir, 'disk.raw');
      await makeExt4Image(disk, 32);
      const boot = await bootGuest({ kernel, diskArgs: virtioDiskArgs(disk), actions: [{ read: '/missing' }], allowFailure: true });
      assert.equal(boot.done, false);
      assert.equal(boot.timedOut, false);
      assert.equal(boot.failure, 'read /missing: no such file');
      await assert.rejects(bootGuest({ kernel, diskArgs: virtioDiskArgs(disk), actions: [{ read: '/missing' }] }), /guest failed: read \/missing/);
    });
  });

  test('no disk: the guest gives up after carryon.wait and says why', async (t) => {
    const kernel = kernelOrSkip(t);
    if (!kernel) return;
    const boot = await bootGuest({ kernel, diskArgs: [], append: 'carryon.wait=1', allowFailure: true });
    assert.equal(boot.failure, 'no block device /dev/vda after 1s');
  });
});
