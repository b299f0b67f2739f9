import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdtemp, readFile, readdir, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, test } from 'node:test';
import { promisify } from 'node:util';
import { createLuksQcow2, fioNbd, nbdSize, parseFio, randomRewrites, serveLuksQcow2, withLuksPeer } from '../../bench/disk.js';

const run = promisify(execFile);

async function withDir(fn: (dir: string) => Promise<void>): Promise<void> {
  const dir = await mkdtemp(join(tmpdir(), 'carryon-disk-bench-test-'));
  try {
    await fn(dir);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

/** Command lines of every process whose argv mentions `needle` (to prove secrets stay out). */
async function argvMentioning(needle: string): Promise<string[]> {
  const found: string[] = [];
  for (const pid of await readdir('/proc')) {
    if (!/^\d+$/.test(pid)) continue;
    try {
      const argv = (await readFile(`/proc/${pid}/cmdline`)).toString().replace(/\0/g, ' ');
      const env = (await readFile(`/proc/${pid}/environ`)).toString();
      if (argv.includes(needle) || env.includes(needle)) found.push(argv);
    } catch {
      // gone, or not ours to read
    }
  }
  return found;
}

describe('disk bench peer (qemu-img, qemu-nbd, fio, nbdcopy)', () => {
  test('parses fio JSON, notes before it included', () => {
    const json = JSON.stringify({
      jobs: [{ error: 0, read: { io_bytes: 4096 * 1000, iops: 1000.5, runtime: 1000, lat_ns: { mean: 250_000, percentile: { '99.000000': 1_500_000 } } }, write: { io_bytes: 0, iops: 0, runtime: 0 } }],
    });
    const r = parseFio(`note: both iodepth >= 1 and synchronous I/O engine are selected\n${json}`, 'randread', 16);
    assert.deepEqual(r, { rw: 'randread', iodepth: 16, iops: 1000.5, p99Us: 1500, meanUs: 250, bytes: 4096000, seconds: 1 });
  });

  test('the LUKS qcow2 is encrypted, its secret never in argv, and qemu-nbd serves the same bytes', async () => {
    await withDir(async (dir) => {
      const raw = join(dir, 'disk.raw');
      const marker = Buffer.from('CARRYON-PLAINTEXT-MARKER-'.repeat(200));
      const data = Buffer.concat([marker, randomBytes(8 * 2 ** 20 - marker.length)]);
      await writeFile(raw, data);
      const secret = randomBytes(32).toString('hex');
      const qcow2 = join(dir, 'enc.qcow2');
      await createLuksQcow2(raw, qcow2, { secret });
      const info = JSON.parse((await run('qemu-img', ['info', '--output=json', qcow2])).stdout) as {
        format: string;
        encrypted?: boolean;
        'format-specific': { data: { encrypt?: { format: string; 'cipher-alg': string; 'cipher-mode': string } } };
      };
      assert.equal(info.format, 'qcow2');
      assert.equal(info.encrypted, true);
      assert.deepEqual(
        [info['format-specific'].data.encrypt?.format, info['format-specific'].data.encrypt?.['cipher-alg'], info['format-specific'].data.encrypt?.['cipher-mode']],
        ['luks', 'aes-256', 'xts'],
      );
      assert.equal((await readFile(qcow2)).includes(marker.subarray(0, 100)), false, 'plaintext visible in the qcow2');

      const peer = await serveLuksQcow2(qcow2, join(dir, 'nbd.sock'), { secret });
      try {
        assert.deepEqual(await argvMentioning(secret), []);
        assert.equal(await nbdSize(peer.uri), data.length);
        const back = join(dir, 'back.raw');
        await run('nbdcopy', [peer.uri, back]);
        assert.deepEqual(await readFile(back), data);
        const r = await fioNbd(peer.uri, 'randread', 4, { runtimeS: 1, rampS: 0 });
        assert.ok(r.iops > 0 && r.p99Us > 0 && r.bytes > 0, JSON.stringify(r));
      } finally {
        await peer.close();
      }
      await assert.rejects(serveLuksQcow2(qcow2, join(dir, 'nbd2.sock'), { secret: 'wrong' }), /qemu-nbd exited.*(Invalid password|password|key)/is);
    });
  });

  test('rewrites total the asked multiple of the disk, and the peer cleans up after itself', async () => {
    await withDir(async (dir) => {
      const raw = join(dir, 'disk.raw');
      await writeFile(raw, randomBytes(4 * 2 ** 20));
      let seen = '';
      const g = await withLuksPeer(
        raw,
        async ({ uri, qcow2 }) => {
          seen = qcow2;
          return randomRewrites(uri, { multiple: 2 });
        },
        { workDir: dir },
      );
      assert.equal(g.bytesWritten, 8 * 2 ** 20);
      assert.equal(g.complete, true);
      assert.deepEqual((await readdir(dir)).sort(), ['disk.raw']);
      assert.ok(seen.startsWith(dir));
    });
  });
});
