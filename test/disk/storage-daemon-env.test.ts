import assert from 'node:assert/strict';
import { test } from 'node:test';
import { daemonEnv } from '../../src/disk/storage-daemon.js';

test('the storage daemon keeps its bounce buffers in the heap (glibc tunables), unless the user set their own', () => {
  const env = daemonEnv({ PATH: '/usr/bin' });
  assert.equal(env.PATH, '/usr/bin');
  assert.match(env.GLIBC_TUNABLES ?? '', /glibc\.malloc\.mmap_threshold=4194304/);
  const own = daemonEnv({ PATH: '/usr/bin', GLIBC_TUNABLES: 'glibc.malloc.arena_max=2' });
  assert.equal(own.GLIBC_TUNABLES, 'glibc.malloc.arena_max=2');
});
