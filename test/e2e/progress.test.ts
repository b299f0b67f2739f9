import assert from 'node:assert/strict';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import type { RunningBroker } from '../../src/broker/start.js';
import { checkout, enroll, status, type ClientEnv } from '../../src/client/ops.js';
import { RateLimiter } from '../../src/transfer/rate-limit.js';
import { ADMIN, api, cleanup, makeImage, testBroker, type Api } from '../broker/harness.js';

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
  await http.call('POST', '/v1/admin/entitlements', { principalType: 'user', principal: 'alice', targetType: 'desktop', target: 'win11' }, admin);
});
after(async () => {
  await http.close();
  await broker.close();
  cleanup(broker.dir);
});

interface Numbers { percent: number | null; rate: number; kind: string; jobId?: string }

test('one truth: status, admin checkouts and admin transfers show the same percentage and a real rate mid-transfer', async (t) => {
  const home = join(broker.dir, 'laptop');
  const env: ClientEnv = { home, user: 'alice', password: async () => 'alice-password', log: () => undefined, pollMs: 20 };
  await enroll(env, broker.url, { fingerprint: broker.fingerprint, name: 'laptop' });
  // 16 MiB of data at 2 MB/s: about 8 s in flight.
  const running = checkout({ ...env, rateLimit: new RateLimiter(2_000_000) }, 'win11');
  let finished = false;
  void running.finally(() => (finished = true)).catch(() => undefined);
  const log: string[] = [];
  const samples: { local: number; checkouts: Numbers; transfers: Numbers }[] = [];
  let firstSeen = 0;
  let jobId = '';
  while (!finished) {
    await new Promise((r) => setTimeout(r, 200));
    // Not in the vault until the check-out has begun.
    const local = (await status(env, 'win11').catch(() => []))[0];
    if (!local || local.state !== 'transferring') continue;
    const co = (await http.call('GET', '/v1/admin/checkouts', undefined, admin)).body as { checkouts: { transfer: Numbers | null }[] };
    const tr = (await http.call('GET', '/v1/admin/transfers', undefined, admin)).body as { active: Numbers[] };
    const again = (await status(env, 'win11').catch(() => []))[0];
    const checkouts = co.checkouts[0]?.transfer;
    const transfers = tr.active.find((j) => j.kind === 'checkout');
    // "The same moment": the laptop's count did not change while the broker was asked.
    if (finished || again?.percentLocal !== local.percentLocal || !checkouts || !transfers || checkouts.percent === null) continue;
    if (local.percentLocal <= 0 || local.percentLocal >= 100) continue;
    firstSeen ||= Date.now();
    jobId = checkouts.jobId!;
    log.push(`${local.percentLocal.toFixed(1)} ${checkouts.percent} ${transfers.percent} ${Math.round(transfers.rate)}`);
    // The rate is measured over a few seconds of transfer-server reports: give it two of them.
    if (Date.now() - firstSeen < 2_000) continue;
    samples.push({ local: local.percentLocal, checkouts, transfers });
  }
  await running;
  t.diagnostic(`status% checkouts% transfers% rate: ${log.join(' | ')}`);
  assert.ok(samples.length >= 2, `${samples.length} samples taken mid-transfer`);
  for (const s of samples) {
    assert.ok(Math.abs(s.local - s.checkouts.percent!) <= 2, `status ${s.local}% vs admin checkouts ${s.checkouts.percent}%`);
    assert.ok(Math.abs(s.local - s.transfers.percent!) <= 2, `status ${s.local}% vs admin transfers ${s.transfers.percent}%`);
    assert.ok(s.checkouts.rate > 0 && s.transfers.rate > 0, `a rate while bytes flow (${s.checkouts.rate}, ${s.transfers.rate} B/s at ${s.local}%)`);
  }
  const done = (await status(env, 'win11'))[0]!;
  assert.equal(done.percentLocal, 100);
  // Only the holder reports a job's progress, and only a count that makes sense.
  assert.equal((await http.call('POST', `/v1/jobs/${jobId}/progress`, { bytesLocal: 1, bytesTotal: 2 }, admin)).status, 403);
  const alice = await http.login('alice', 'alice-password');
  assert.equal((await http.call('POST', `/v1/jobs/${jobId}/progress`, { bytesLocal: 3, bytesTotal: 2 }, alice)).status, 400);
  assert.equal((await http.call('POST', `/v1/jobs/${jobId}/progress`, { bytesLocal: 1, bytesTotal: 2 }, alice)).status, 200);
});
