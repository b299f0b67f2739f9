import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, test } from 'node:test';
import { CarryonError } from '../../src/core/errors.js';
import { claimOwner } from '../../src/live/fill/holder.js';
import type { DesktopRecords } from '../../src/live/disks/state.js';

// Who holds a desktop's chain (live/fill/holder.ts): the agent's background replica gives way to a
// user's command on a stopped desktop, as a running desktop's does over its control socket.

const dir = mkdtempSync(join(tmpdir(), 'carryon-owner-'));
after(() => rmSync(dir, { recursive: true, force: true }));
const vault = { home: dir, desktopDir: (id: string) => join(dir, id) } as unknown as DesktopRecords;
const holderUrl = new URL('../../src/live/fill/holder.js', import.meta.url).href;

/** Another process holding d1 as `kind`; on SIGTERM it lets go and ends, as a transfer command does. */
async function otherOwner(kind: string, background: boolean, deaf = false) {
  const script = `
    import { claimOwner } from ${JSON.stringify(holderUrl)};
    const release = await claimOwner({ home: ${JSON.stringify(dir)}, desktopDir: (id) => ${JSON.stringify(dir)} + '/' + id }, 'd1', ${JSON.stringify(kind)}, () => {}, { background: ${background} });
    process.on('SIGTERM', async () => { if (${deaf}) return; await release(); process.exit(0); });
    console.log('claimed');
    setInterval(() => {}, 1000);
  `;
  const child = spawn(process.execPath, ['--input-type=module', '-e', script], { stdio: ['ignore', 'pipe', 'inherit'] });
  const ended = new Promise<number | null>((r) => child.once('exit', r));
  await new Promise<void>((resolve, reject) => {
    child.stdout!.setEncoding('utf8').on('data', (d: string) => d.includes('claimed') && resolve());
    void ended.then(() => reject(new Error('the other owner ended before it claimed')));
  });
  return { child, ended };
}

test('a user\'s command stops the agent\'s background replica of a stopped desktop and takes the chain; any other holder, or a second background replica, is refused', async () => {
  const logs: string[] = [];
  const bg = await otherOwner('replicate', true);
  try {
    const release = await claimOwner(vault, 'd1', 'checkin', (l) => logs.push(l));
    assert.equal(await bg.ended, 0, 'the background replica was stopped and ended');
    assert.match(logs.join('\n'), /stopping the agent's background replica \(pid \d+\); its changes go with the next one/);
    await release();
  } finally {
    bg.child.kill('SIGKILL');
  }

  const user = await otherOwner('replicate', false);
  try {
    await assert.rejects(claimOwner(vault, 'd1', 'checkin', () => undefined), (e: unknown) => e instanceof CarryonError && e.code === 'disk-busy' && /in use by `carryon replicate`/.test(e.message));
    assert.equal(user.child.exitCode, null, 'a user\'s replica is not stopped');
  } finally {
    user.child.kill('SIGTERM');
    await user.ended;
  }

  const first = await otherOwner('replicate', true);
  try {
    await assert.rejects(claimOwner(vault, 'd1', 'replicate', () => undefined, { background: true }), (e: unknown) => e instanceof CarryonError && e.code === 'disk-busy');
    assert.equal(first.child.exitCode, null);
  } finally {
    first.child.kill('SIGTERM');
    await first.ended;
  }
});

test('a background replica that does not end on SIGTERM is killed after 10 s and its claim taken over', async () => {
  const deaf = await otherOwner('replicate', true, true);
  try {
    const t0 = Date.now();
    const release = await claimOwner(vault, 'd1', 'checkin', () => undefined);
    assert.ok(Date.now() - t0 >= 9_000, 'it had its grace time');
    await deaf.ended;
    assert.equal(deaf.child.signalCode, 'SIGKILL');
    await release();
  } finally {
    deaf.child.kill('SIGKILL');
  }
});
