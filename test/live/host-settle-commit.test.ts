import assert from 'node:assert/strict';
import { existsSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, test } from 'node:test';
import { readLayout, writeLayout } from '../../src/host/layout.js';
import { settleCommit, type ReplicaCommit } from '../../src/host/replica.js';

// carryon-test: sqlite-only

/**
 * A host's replica whose commit answer was lost (issue 26 item 6): at its next contact the host
 * sends the same commit again, and folds its frozen layer only if the broker's snapshot has the
 * digests the host computed. A broker (or something between) answering a replayed commit with
 * other digests must not make the host fold its writes into a base that is not that snapshot.
 */
const dir = mkdtempSync(join(tmpdir(), 'carryon-settle-'));
after(() => rmSync(dir, { recursive: true, force: true }));

const mine = 'a'.repeat(64);
const other = 'b'.repeat(64);

async function pendingReplica(name: string) {
  const root = join(dir, name);
  const disk = join(root, 'disk0');
  const { mkdir } = await import('node:fs/promises');
  await mkdir(disk, { recursive: true });
  // The frozen layer is open (offline: the guest stopped before the answer came).
  await writeLayout(disk, { v: 1, top: 'top-b.qcow2', under: 'top.qcow2', mergingTo: null });
  const file = join(root, 'pending.json');
  writeFileSync(file, JSON.stringify({ v: 1, jobId: 'job-1', disks: [{ name: 'disk0', changes: [[3, 'c'.repeat(64)]] }], digests: { disk0: mine } }));
  const disks = [{ name: 'disk0', dir: disk, chain: () => { throw new Error('not opened offline'); } }];
  return { file, disk, disks };
}

test('a replayed replica commit answered with other digests is refused: nothing folds, the writes stay in the top; with its own digests it folds', async () => {
  const sent: unknown[] = [];
  const wrong: ReplicaCommit = async (jobId, disks) => (sent.push({ jobId, disks }), { snapshotId: 's-wrong', disks: [{ name: 'disk0', digest: other }] });
  const a = await pendingReplica('wrong');
  await assert.rejects(settleCommit({ file: a.file, disks: a.disks, commit: wrong, abandon: async () => undefined }), (err: Error & { code?: string }) => err.code === 'host-chain-diverged' && /other disks than this host sent/.test(err.message));
  assert.deepEqual(sent, [{ jobId: 'job-1', disks: [{ name: 'disk0', changes: [[3, 'c'.repeat(64)]] }] }], 'the same commit went again');
  assert.equal(readLayout(a.disk).mergingTo, null, 'nothing folds into the base');
  assert.equal(readLayout(a.disk).under, 'top.qcow2', 'the frozen layer is kept for settleReplica to put back into the top');
  assert.equal(existsSync(a.file), false, 'not asked again');

  // A disk missing from the answer is as wrong as another digest.
  const missing: ReplicaCommit = async () => ({ snapshotId: 's-missing', disks: [] });
  const b = await pendingReplica('missing');
  await assert.rejects(settleCommit({ file: b.file, disks: b.disks, commit: missing, abandon: async () => undefined }), /other disks than this host sent/);
  assert.equal(readLayout(b.disk).mergingTo, null);

  // The broker's snapshot is what the host computed: the frozen layer folds to it.
  const right: ReplicaCommit = async () => ({ snapshotId: 's-right', disks: [{ name: 'disk0', digest: mine }] });
  const c = await pendingReplica('right');
  assert.equal(await settleCommit({ file: c.file, disks: c.disks, commit: right, abandon: async () => undefined }), 'committed');
  assert.equal(readLayout(c.disk).mergingTo, mine);
});
