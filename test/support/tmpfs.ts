import { execFileSync } from 'node:child_process';
import { mkdirSync } from 'node:fs';
import type { TestContext } from 'node:test';

/**
 * Runs `fn` on a fresh tmpfs of `size` (e.g. "2m") mounted at `mnt`, a small disk that can run
 * full; skips the test where mounting is not allowed (needs root). Unmounts lazily afterwards,
 * so a handle left open by a failing test cannot hide its real failure.
 */
export async function withTmpfs(t: TestContext, mnt: string, size: string, fn: () => Promise<void>): Promise<void> {
  mkdirSync(mnt);
  try {
    execFileSync('mount', ['-t', 'tmpfs', '-o', `size=${size}`, 'tmpfs', mnt], { stdio: 'ignore' });
  } catch {
    t.skip('cannot mount a tmpfs here (needs root)');
    return;
  }
  try {
    await fn();
  } finally {
    execFileSync('umount', ['-l', mnt], { stdio: 'ignore' });
  }
}
