import assert from 'node:assert/strict';
import { chmodSync, chownSync, mkdirSync, mkdtempSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import { daemonEnv, StorageDaemon } from '../../src/disk/storage-daemon.js';

test('the storage daemon keeps its bounce buffers in the heap (glibc tunables), unless the user set their own', () => {
  const env = daemonEnv({ PATH: '/usr/bin' });
  assert.equal(env.PATH, '/usr/bin');
  assert.match(env.GLIBC_TUNABLES ?? '', /glibc\.malloc\.mmap_threshold=4194304/);
  const own = daemonEnv({ PATH: '/usr/bin', GLIBC_TUNABLES: 'glibc.malloc.arena_max=2' });
  assert.equal(own.GLIBC_TUNABLES, 'glibc.malloc.arena_max=2');
});

test('the storage daemon\'s run and socket directories (issue 22): loose ones are tightened to 0700 before QEMU makes a socket there; another user\'s is refused', async () => {
  const base = mkdtempSync(join(tmpdir(), 'carryon-qsd-dirs-'));
  try {
    const runDir = join(base, 'run');
    mkdirSync(runDir);
    chmodSync(runDir, 0o777);
    const qsd = await StorageDaemon.start(runDir);
    try {
      assert.equal(statSync(runDir).mode & 0o777, 0o700);
      const sockDir = join(base, 'sockets');
      mkdirSync(sockDir);
      chmodSync(sockDir, 0o755);
      await qsd.exportNbd(join(sockDir, 'nbd.sock'), []);
      assert.equal(statSync(sockDir).mode & 0o777, 0o700, 'tightened before nbd-server-start');
      assert.equal(statSync(join(sockDir, 'nbd.sock')).mode & 0o777, 0o600);
    } finally {
      await qsd.stop(5000);
    }
    if (process.getuid?.() === 0) {
      const foreign = join(base, 'foreign');
      mkdirSync(foreign, { mode: 0o700 });
      chownSync(foreign, 65534, 65534);
      await assert.rejects(StorageDaemon.start(foreign), (err: Error & { code?: string }) => err.code === 'unsafe-socket-dir');
    }
  } finally {
    rmSync(base, { recursive: true, force: true });
  }
});
