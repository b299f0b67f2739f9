import assert from 'node:assert/strict';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import type { RunningBroker } from '../../src/broker/start.js';
import { checkout, enroll, release, status, type ClientEnv } from '../../src/client/ops.js';
import { serveDesktop } from '../../src/client/ops/serve.js';
import { RateLimiter } from '../../src/transfer-client/rate-limit.js';
import { ADMIN, api, cleanup, makeImage, testBroker, type Api } from '../broker/harness.js';

// carryon-test: sqlite-only (its subject is the laptop's progress beside the broker's views; beside a
// TCG guest the PostgreSQL pass took too few same-moment samples. The broker's job progress on
// PostgreSQL is broker/job-progress.test.ts.)

process.env.CARRYON_SCRYPT_N = '1024';
let broker: RunningBroker & { dir: string };
let http: Api;
let admin: string;

before(async () => {
  broker = await testBroker();
  http = api(broker.url, broker.fingerprint);
  admin = await http.login(ADMIN.name, ADMIN.password);
  await http.call('POST', '/v1/admin/users', { name: 'alice', password: 'alice-password' }, admin);
  // Half of each 512 KiB is zeros: with 256 KiB chunks, half the disk is holes (not counted).
  const image = makeImage(broker.dir, 32);
  assert.equal((await http.call('POST', '/v1/admin/desktops', { name: 'win11', image }, admin)).status, 201);
  // Not a clone: the laptop holds win11, whose chunks a clone would copy locally instead of transferring them.
  assert.equal((await http.call('POST', '/v1/admin/desktops', { name: 'ubuntu', image: makeImage(broker.dir, 32, 'ubuntu.raw') }, admin)).status, 201);
  for (const target of ['win11', 'ubuntu']) await http.call('POST', '/v1/admin/entitlements', { principalType: 'user', principal: 'alice', targetType: 'desktop', target }, admin);
});
after(async () => {
  await http.close();
  await broker.close();
  cleanup(broker.dir);
});

interface Numbers { percent: number | null; rate: number; kind: string; jobId?: string; desktop?: string; bytesCopiedLocally?: number | null }

/**
 * Samples `status`, `GET /v1/admin/checkouts` and `GET /v1/admin/transfers` until `finished()`,
 * keeping the samples where the laptop's count did not change while the broker was asked ("the
 * same moment") and the rate had two seconds of reports.
 */
async function watch(env: ClientEnv, desktop: string, finished: () => boolean | Promise<boolean>) {
  const log: string[] = [];
  const samples: { local: number; copied: number | null; checkouts: Numbers; transfers: Numbers }[] = [];
  // Every same-moment reading, the first two seconds' too (the rate needs two seconds of reports; the rest does not).
  const readings: typeof samples = [];
  let firstSeen = 0;
  let jobId = '';
  let first: number | null = null;
  while (!(await finished())) {
    await new Promise((r) => setTimeout(r, 200));
    // Not in the vault until the check-out has begun.
    const local = (await status(env, desktop).catch(() => []))[0];
    if (!local || local.state !== 'transferring') continue;
    const co = (await http.call('GET', '/v1/admin/checkouts', undefined, admin)).body as { checkouts: { desktopId: string; transfer: Numbers | null }[] };
    const tr = (await http.call('GET', '/v1/admin/transfers', undefined, admin)).body as { active: Numbers[] };
    const again = (await status(env, desktop).catch(() => []))[0];
    const checkouts = co.checkouts.find((c) => c.desktopId === local.desktopId)?.transfer;
    const transfers = tr.active.find((j) => j.kind === 'checkout' && j.desktop === desktop);
    // The same moment: nothing moved while the sample was read (a report landing between the two
    // admin views would otherwise show them one step apart).
    const coAgain = ((await http.call('GET', '/v1/admin/checkouts', undefined, admin)).body as typeof co).checkouts.find((c) => c.desktopId === local.desktopId)?.transfer;
    first ??= local.percentLocal;
    if ((await finished()) || again?.percentLocal !== local.percentLocal || !checkouts || !transfers || checkouts.percent === null || coAgain?.percent !== checkouts.percent) continue;
    if (local.percentLocal <= 0 || local.percentLocal >= 100) continue;
    readings.push({ local: local.percentLocal, copied: local.chunksCopiedLocally, checkouts, transfers });
    firstSeen ||= Date.now();
    jobId = checkouts.jobId!;
    log.push(`${local.percentLocal.toFixed(1)} ${checkouts.percent} ${transfers.percent} ${Math.round(transfers.rate)}`);
    if (Date.now() - firstSeen < 2_000) continue;
    samples.push({ local: local.percentLocal, copied: local.chunksCopiedLocally, checkouts, transfers });
  }
  return { samples, readings, jobId, first, log: `status% checkouts% transfers% rate: ${log.join(' | ')}` };
}

function agree({ samples, log }: Awaited<ReturnType<typeof watch>>): void {
  assert.ok(samples.length >= 2, `${samples.length} samples taken mid-transfer; ${log}`);
  for (const s of samples) {
    assert.ok(Math.abs(s.local - s.checkouts.percent!) <= 2, `status ${s.local}% vs admin checkouts ${s.checkouts.percent}%`);
    assert.ok(Math.abs(s.local - s.transfers.percent!) <= 2, `status ${s.local}% vs admin transfers ${s.transfers.percent}%`);
    assert.ok(s.checkouts.rate > 0 && s.transfers.rate > 0, `a rate while bytes flow (${s.checkouts.rate}, ${s.transfers.rate} B/s at ${s.local}%)`);
  }
}

const home = () => join(broker.dir, 'laptop');
const env = (): ClientEnv => ({ home: home(), user: 'alice', password: async () => 'alice-password', log: () => undefined, pollMs: 20 });

test('one truth: status, admin checkouts and admin transfers show the same percentage and a real rate mid-transfer', async (t) => {
  await enroll(env(), broker.url, { fingerprint: broker.fingerprint, name: 'laptop' });
  // 16 MiB of data at 1 MB/s: about 16 s in flight (samples need time when the box is busy).
  let finished = false;
  const running = checkout({ ...env(), rateLimit: new RateLimiter(1_000_000) }, 'win11').finally(() => (finished = true));
  const seen = await watch(env(), 'win11', () => finished);
  await running;
  t.diagnostic(seen.log);
  agree(seen);
  const done = (await status(env(), 'win11'))[0]!;
  assert.equal(done.percentLocal, 100);
  // Only the holder reports a job's progress, and only a count that makes sense.
  const { jobId } = seen;
  assert.equal((await http.call('POST', `/v1/jobs/${jobId}/progress`, { bytesLocal: 1, bytesTotal: 2 }, admin)).status, 403);
  const alice = await http.login('alice', 'alice-password');
  assert.equal((await http.call('POST', `/v1/jobs/${jobId}/progress`, { bytesLocal: 3, bytesTotal: 2 }, alice)).status, 400);
  assert.equal((await http.call('POST', `/v1/jobs/${jobId}/progress`, { bytesLocal: 1, bytesTotal: 2 }, alice)).status, 200);
});

test('the same truth when `serve` takes a stopped check-out over: it goes on from where the check-out got to', async (t) => {
  const abort = new AbortController();
  let stoppedAt = 0;
  await assert.rejects(checkout({ ...env(), signal: abort.signal, onProgress: (_l, p) => {
    if (p.bytesLocal! >= p.bytesTotal! / 4 && !abort.signal.aborted) {
      stoppedAt = (100 * p.bytesLocal!) / p.bytesTotal!;
      abort.abort();
    }
  } }, 'ubuntu'));
  // The background fill (QEMU's block-stream) reports QEMU's offsets as data bytes present.
  const served = await serveDesktop({ ...env(), rateLimit: new RateLimiter(1_000_000) }, 'ubuntu');
  try {
    const seen = await watch(env(), 'ubuntu', async () => (await status(env(), 'ubuntu'))[0]!.state !== 'transferring');
    t.diagnostic(`stopped at ${stoppedAt.toFixed(1)}%; ${seen.log}`);
    assert.ok(seen.first !== null && seen.first >= stoppedAt - 2, `serve starts from what the check-out left (${seen.first}% after ${stoppedAt}%)`);
    agree(seen);
  } finally {
    await served.close();
  }
  assert.equal((await status(env(), 'ubuntu'))[0]!.percentLocal, 100);
});

test('chunks copied from the laptop\'s own copy of a clone count as done work in every view, which says how many were copied and fetched', async (t) => {
  // 48 MiB, half holes: 96 data chunks. The laptop keeps 32+ of them (a cancelled check-out's parked copy); its clone needs them all.
  assert.equal((await http.call('POST', '/v1/admin/desktops', { name: 'tally', image: makeImage(broker.dir, 48, 'tally.raw') }, admin)).status, 201);
  assert.equal((await http.call('POST', '/v1/admin/desktops', { name: 'tally-2', cloneOf: 'tally' }, admin)).status, 201);
  for (const target of ['tally', 'tally-2']) await http.call('POST', '/v1/admin/entitlements', { principalType: 'user', principal: 'alice', targetType: 'desktop', target }, admin);
  const mine: ClientEnv = { ...env(), home: join(broker.dir, 'laptop-tally') };
  await enroll(mine, broker.url, { fingerprint: broker.fingerprint, name: 'laptop-tally' });
  const abort = new AbortController();
  await assert.rejects(checkout({ ...mine, signal: abort.signal, onProgress: (_l, p) => p.chunksDone >= 32 && abort.abort() }, 'tally'));
  assert.equal((await release(mine, 'tally', 'cancel')).parked, true);

  const lines: { copied: number; fetched: number; percent: number }[] = [];
  let finished = false;
  const running = checkout({ ...mine, rateLimit: new RateLimiter(1_000_000), onProgress: (_l, p) => lines.push({ copied: p.chunksCopied ?? 0, fetched: p.chunksDone, percent: (100 * p.bytesLocal!) / p.bytesTotal! }) }, 'tally-2')
    .finally(() => (finished = true));
  const seen = await watch(mine, 'tally-2', () => finished);
  const done = await running;
  t.diagnostic(`${done.copiedChunks} copied, ${done.chunksMoved} fetched; ${seen.log}`);
  assert.ok(done.copiedChunks >= 32 && done.copiedChunks + done.chunksMoved === 96, `${done.copiedChunks} copied + ${done.chunksMoved} fetched`);
  const copiedShare = (100 * done.copiedChunks) / 96;
  // The progress line: the copying is progress of its own (rising, nothing fetched yet), then the fetch goes on from there.
  const copying = lines.filter((l, i) => i > 0 && l.copied > lines[i - 1]!.copied).map((l, i) => ({ ...l, before: lines[lines.indexOf(l) - 1]! }));
  assert.ok(copying.length >= done.copiedChunks / 2, `${copying.length} lines while copying`);
  for (const c of copying) assert.ok(c.percent > c.before.percent && c.fetched === 0, `each chunk copied is progress: ${JSON.stringify(c)}`);
  assert.ok(Math.abs(copying[copying.length - 1]!.percent - copiedShare) <= 1, `${copying[copying.length - 1]!.percent}% once copied (${copiedShare}%)`);
  assert.ok(lines.every((l) => l.fetched === 0 || l.copied === done.copiedChunks), 'each fetch line says how many were copied');
  // status, admin checkouts and admin transfers: the same percentage, counting the copied chunks, and the same split.
  assert.ok(seen.readings.length >= 1, `a reading mid-transfer; ${seen.log}`);
  // A reading may fall in the copy itself (the count published once a second): each counts what was copied by then.
  for (const s of seen.readings) {
    assert.ok(s.copied !== null && s.copied > 0 && s.copied <= done.copiedChunks, `status: ${s.copied} chunks copied here`);
    assert.ok(s.local >= (100 * s.copied) / 96 - 2, `${s.local}% counts the ${s.copied} chunks copied`);
    // Once the copy is over its count no longer moves: the broker's is the laptop's (mid-copy, a report may be a second behind).
    const bytes = (s.copied === done.copiedChunks ? s.copied : done.copiedChunks) * 256 * 1024;
    for (const [view, n] of [['admin transfers', s.transfers.bytesCopiedLocally], ['admin checkouts', s.checkouts.bytesCopiedLocally]] as const) {
      if (s.copied === done.copiedChunks) assert.equal(n, bytes, `${view}: bytes copied on the laptop`);
      else assert.ok(n !== undefined && n !== null && n <= bytes, `${view}: ${n} bytes copied so far`);
    }
  }
  assert.ok(seen.readings.some((s) => s.copied === done.copiedChunks && s.local >= copiedShare - 2 && s.local < 100), `a reading after the copy, counting all of it; ${seen.log}`);
  agree(seen);
});
