import assert from 'node:assert/strict';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, test } from 'node:test';
import type { BlockHost } from '../../src/disk/storage-daemon.js';
import { BACKGROUND_FOLD_BYTES_PER_S, LiveChain, type LiveLayers } from '../../src/live/live-chain.js';
import type { QmpConnection, QmpEvent } from '../../src/qemu/qmp.js';

// A background replica's fold yields to the guest's I/O (QEMU's block-job speed), and whoever then
// waits on the chain (a check-in's freeze, a shutdown) lifts the limit. The holder's QMP is faked:
// what is asked of QEMU is the subject here (test/e2e/live.test.ts runs the real chain).

const dir = mkdtempSync(join(tmpdir(), 'carryon-bgfold-'));
after(() => rmSync(dir, { recursive: true, force: true }));

function fakeHost() {
  const calls: { command: string; args?: Record<string, unknown> }[] = [];
  const waiters: { match: (e: QmpEvent) => boolean; resolve: (e: QmpEvent) => void }[] = [];
  const emit = (e: QmpEvent) => {
    for (const w of waiters.splice(0)) if (w.match(e)) w.resolve(e); else waiters.push(w);
  };
  const qmp = {
    async execute(command: string, args?: Record<string, unknown>) {
      calls.push({ command, args });
      if (command === 'block-export-del') setImmediate(() => emit({ event: 'BLOCK_EXPORT_DELETED', data: { id: args?.id } }));
      return {};
    },
    waitEvent(match: (e: QmpEvent) => boolean) {
      return new Promise<QmpEvent>((resolve) => waiters.push({ match, resolve }));
    },
  };
  return { host: { qmp: qmp as unknown as QmpConnection } satisfies BlockHost, calls, emit };
}

function fakeLayers(): LiveLayers {
  const top = join(dir, 'top.qcow2');
  writeFileSync(top, '');
  return {
    disks: () => [{ name: 'disk0', prefix: 'd0', topSecretId: 'sec-d0', baseDigest: 'a'.repeat(64) }],
    beginPoint: async () => join(dir, 'next.qcow2'),
    acknowledged: async () => undefined,
    folded: async () => undefined,
    abandoned: async () => undefined,
    frozenExtents: async () => [],
    topPath: () => top,
  };
}

const nbd = { socketPath: join(dir, 'nbd.sock'), ensureServer: async () => undefined };
const until = async (ok: () => boolean) => {
  for (let i = 0; i < 200 && !ok(); i++) await new Promise((r) => setTimeout(r, 5));
  assert.ok(ok(), 'timed out waiting');
};

test('a background fold runs with the speed limit; a freeze that waits on it lifts the limit first; a foreground fold has none', async () => {
  const { host, calls, emit } = fakeHost();
  const chain = new LiveChain(host, fakeLayers(), nbd);
  const first = await chain.freeze();
  const folding = chain.fold(first.id, new Map([['disk0', 'b'.repeat(64)]]), { background: true });
  await until(() => calls.some((c) => c.command === 'block-commit'));
  const commit = calls.find((c) => c.command === 'block-commit')!;
  assert.equal(commit.args?.speed, BACKGROUND_FOLD_BYTES_PER_S, 'the background fold is speed-limited');
  const jobId = commit.args?.['job-id'];

  // A check-in's freeze arrives while it folds: the job is told to go at full speed, then the freeze waits its turn.
  const next = chain.freeze();
  await until(() => calls.some((c) => c.command === 'block-job-set-speed'));
  assert.deepEqual(calls.find((c) => c.command === 'block-job-set-speed')!.args, { device: jobId, speed: 0 });
  assert.ok(!calls.some((c) => c.command === 'transaction' && calls.indexOf(c) > calls.indexOf(commit)), 'the freeze waits for the fold');
  emit({ event: 'BLOCK_JOB_COMPLETED', data: { device: jobId } });
  await folding;
  const second = await next;

  // Nothing slow in flight: hurrying asks nothing of QEMU; a foreground fold (a check-in's bulk) runs unlimited.
  const before = calls.length;
  await chain.hurry();
  assert.equal(calls.length, before);
  const fg = chain.fold(second.id, new Map([['disk0', 'c'.repeat(64)]]));
  await until(() => calls.filter((c) => c.command === 'block-commit').length === 2);
  const fgCommit = calls.filter((c) => c.command === 'block-commit')[1]!;
  assert.equal(fgCommit.args?.speed, undefined);
  emit({ event: 'BLOCK_JOB_COMPLETED', data: { device: fgCommit.args?.['job-id'] } });
  await fg;
});

test('a background replica\'s freeze waits behind a background fold at its pace (nothing hurried); a check-in\'s freeze then still hurries it', async () => {
  const { host, calls, emit } = fakeHost();
  const chain = new LiveChain(host, fakeLayers(), nbd);
  const first = await chain.freeze({ background: true });
  const folding = chain.fold(first.id, new Map([['disk0', 'b'.repeat(64)]]), { background: true });
  await until(() => calls.some((c) => c.command === 'block-commit'));
  const jobId = calls.find((c) => c.command === 'block-commit')!.args?.['job-id'];
  let taken = false;
  const scheduled = chain.freeze({ background: true }).then((p) => ((taken = true), p));
  await new Promise((r) => setTimeout(r, 30));
  assert.equal(calls.some((c) => c.command === 'block-job-set-speed'), false, 'the scheduled replica does not lift the guest\'s share');
  assert.equal(taken, false, 'it waits for the fold');
  // A check-in arrives meanwhile: it is in a hurry.
  const checkin = chain.freeze();
  await until(() => calls.some((c) => c.command === 'block-job-set-speed'));
  emit({ event: 'BLOCK_JOB_COMPLETED', data: { device: jobId } });
  await folding;
  assert.ok((await scheduled).id);
  // The point stays open (this fake folds nothing more): the check-in's freeze is told so.
  await assert.rejects(checkin, /already being taken/);
});
