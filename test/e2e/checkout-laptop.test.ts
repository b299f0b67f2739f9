// carryon-test: sqlite-only (the laptop's check-out path is the subject: disk full, big chunks, kill -9 resume,
// --limit-rate; the broker's side of a check-out runs on PostgreSQL in lifecycle.test.ts)
import assert from 'node:assert/strict';
import { readdirSync, readFileSync, rmSync, statfsSync, writeFileSync } from 'node:fs';
import { CarryonError } from '../../src/core/errors.js';
import { spawn } from 'node:child_process';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { checkout, enroll, release, status, type ClientEnv } from '../../src/client/ops.js';
import { readDesktop } from '../support/laptop.js';
import { serveDesktop } from '../../src/client/ops/serve.js';
import { brokerWithAlice, makeImage, serverDisk as sharedServerDisk, type Api, type TestBroker } from '../broker/harness.js';
import { withTmpfs } from '../support/tmpfs.js';
import { RateLimiter } from '../../src/transfer-client/rate-limit.js';

process.env.CARRYON_SCRYPT_N = '1024';
let broker: TestBroker;
let http: Api;
let admin: string;
const CHUNK = 256 * 1024;
const logs: string[] = [];

function env(home: string, password = 'alice-password'): ClientEnv {
  return { home, user: 'alice', password: async () => password, log: (l) => logs.push(l), pollMs: 20 };
}

let stop: () => Promise<void>;
before(async () => {
  ({ broker, http, admin, close: stop } = await brokerWithAlice());
  assert.equal((await http.call('POST', '/v1/admin/desktops', { name: 'ubuntu', image: makeImage(broker.dir, 32) }, admin)).status, 201);
});
after(() => stop());

const serverDisk = (desktop: string) => sharedServerDisk(broker, desktop);

test('disk full during check-out: a clear error, nothing lost, the rerun completes', async (t) => {
  // The laptop's home on a small tmpfs that a "filler" file runs out of space mid-transfer.
  const mnt = join(broker.dir, 'small-disk');
  await withTmpfs(t, mnt, '48m', async () => {
    const home = join(mnt, 'home');
    await http.call('POST', '/v1/admin/users', { name: 'carol', password: 'carol-password' }, admin);
    await http.call('POST', '/v1/admin/entitlements', { principalType: 'user', principal: 'carol', targetType: 'desktop', target: 'ubuntu' }, admin);
    const carol: ClientEnv = { home, user: 'carol', password: async () => 'carol-password', log: () => undefined, pollMs: 20 };
    await enroll(carol, broker.url, { fingerprint: broker.fingerprint, name: 'small-laptop' });
    const filler = join(mnt, 'filler');
    let filled = false;
    const fill = () => {
      if (filled) return;
      filled = true;
      const free = statfsSync(mnt).bavail * statfsSync(mnt).bsize;
      writeFileSync(filler, Buffer.alloc(Math.max(0, free - 64 * 1024)));
    };
    await assert.rejects(checkout({ ...carol, onProgress: fill }, 'ubuntu'), (e: unknown) => e instanceof CarryonError && e.code === 'disk-full' && /run `carryon checkout` again/.test(e.message));
    const [st] = await status(carol, 'ubuntu');
    assert.equal(st!.state, 'transferring', 'the vault still knows the check-out in flight');
    rmSync(filler);
    const done = await checkout(carol, 'ubuntu');
    assert.ok(done.bytesMoved > 0);
    const [after] = await status(carol, 'ubuntu');
    assert.deepEqual([after!.state, after!.safeOffline], ['checked_out', true]);
    const disk = await readDesktop(carol, 'ubuntu');
    assert.ok(disk.equals(await serverDisk('ubuntu')), 'byte-identical after the interrupted check-out');
    await release(carol, 'ubuntu', 'rollback');
  });
});

test('4 MiB chunks (larger than any qcow2 cluster): the base writer steps aside and the check-out goes through the storage daemon, byte for byte', async () => {
  const image = makeImage(broker.dir, 32);
  const r = await http.call('POST', '/v1/admin/desktops', { name: 'bigchunks', image, chunkSize: 4 * 1024 * 1024, config: { vcpus: 1, ramMiB: 512, minRamMiB: 256 } }, admin);
  assert.equal(r.status, 201, JSON.stringify(r.body));
  await http.call('POST', '/v1/admin/entitlements', { principalType: 'user', principal: 'alice', targetType: 'desktop', target: 'bigchunks' }, admin);
  const home = join(broker.dir, 'laptop-bigchunks');
  await enroll(env(home), broker.url, { fingerprint: broker.fingerprint, name: 'laptop-bigchunks' });
  logs.length = 0;
  const co = await checkout(env(home), 'bigchunks');
  assert.ok(co.bytesMoved > 0);
  assert.ok(logs.some((l) => /writing through QEMU: .*cluster size/.test(l)), logs.join('\n'));
  const [st] = await status(env(home), 'bigchunks');
  assert.deepEqual([st!.state, st!.safeOffline], ['checked_out', true]);
  assert.ok((await readDesktop(env(home), 'bigchunks')).equals(await serverDisk('bigchunks')), 'byte-identical through the daemon');
  await release(env(home), 'bigchunks', 'rollback');
});

/** Chunk indexes recorded durable in every `filled.json` under `home` (fill-direct.ts). */
function filledCount(home: string): number {
  const walk = (dir: string): string[] => readdirSync(dir, { withFileTypes: true }).flatMap((e) => (e.isDirectory() ? walk(join(dir, e.name)) : e.name === 'filled.json' ? [join(dir, e.name)] : []));
  return walk(home).reduce((n, f) => n + (JSON.parse(readFileSync(f, 'utf8')) as { chunks: number[] }).chunks.length, 0);
}

const chunksOut = () => [...broker.transfer!.stats.perJob.values()].reduce((n, j) => n + j.chunksOut, 0);

test('kill -9 of a check-out at ten points (three fixed, seven at random chunk counts): what was made durable stays, each rerun fetches only the rest, the disk is byte-identical', async (t) => {
  const image = makeImage(broker.dir, 128, 'resume.raw');
  const r = await http.call('POST', '/v1/admin/desktops', { name: 'resume', image, config: { vcpus: 1, ramMiB: 512, minRamMiB: 256 } }, admin);
  assert.equal(r.status, 201, JSON.stringify(r.body));
  await http.call('POST', '/v1/admin/entitlements', { principalType: 'user', principal: 'alice', targetType: 'desktop', target: 'resume' }, admin);
  const home = join(broker.dir, 'laptop-resume');
  await enroll(env(home), broker.url, { fingerprint: broker.fingerprint, name: 'laptop-resume' });
  const total = 256; // 128 MiB, every other 256 KiB chunk random (makeImage)
  const child = new URL('../support/checkout-child.js', import.meta.url).pathname;
  let durable = 0;
  // A real SIGKILL, sent by the child to itself (fill-direct.ts's test hooks) while other writes are in flight:
  // once this many chunks are recorded durable (a group made durable mid-transfer, not only at a clean stop),
  // or once this many chunks of the run arrived (whatever was durable by then).
  // The third waits for this run's first durable group (an absolute 90 was sometimes passed by one final group under load: 128 of 128).
  // Seven more at random chunk counts (1–16 chunks into a run) on the SQLite pass: the resume logic is
  // the laptop's; the diagnostics name the counts, so a failure can be replayed.
  const randomPoints = process.env.CARRYON_TEST_DATABASE === 'postgres' ? [] : Array.from({ length: 7 }, () => String(1 + Math.floor(Math.random() * 16)));
  t.diagnostic(`random kill points (chunks into a run): ${randomPoints.join(' ') || 'none on this pass'}`);
  const points = [
    () => ({ CARRYON_TEST_SIGKILL_AFTER_FILLED: '35' }),
    () => ({ CARRYON_TEST_SIGKILL_AFTER_CHUNKS: '30' }),
    ...randomPoints.map((n) => () => ({ CARRYON_TEST_SIGKILL_AFTER_CHUNKS: n })),
    () => ({ CARRYON_TEST_SIGKILL_AFTER_FILLED: String(durable + 1) }),
  ];
  for (const pointAt of points) {
    const point: Record<string, string> = pointAt();
    const wireBefore = chunksOut();
    const ended = await new Promise<{ code: number | null; signal: NodeJS.Signals | null; stderr: string }>((resolve, reject) => {
      const p = spawn(process.execPath, [child, home, 'alice', 'alice-password', 'resume'], { env: { ...process.env, ...point }, stdio: ['ignore', 'ignore', 'pipe'] });
      let stderr = '';
      p.stderr.setEncoding('utf8').on('data', (s: string) => (stderr += s));
      p.once('error', reject);
      p.once('close', (code, signal) => resolve({ code, signal, stderr }));
    });
    assert.equal(ended.signal, 'SIGKILL', `killed at ${JSON.stringify(point)} (${durable} durable before): exit ${ended.code}, ${filledCount(home)} durable now\n${ended.stderr}`);
    const now = filledCount(home);
    const want = Number(Object.values(point)[0]);
    if ('CARRYON_TEST_SIGKILL_AFTER_FILLED' in point) assert.ok(now >= want && now < total, `killed mid-transfer with ${want}+ chunks durable: ${now} of ${total}`);
    else assert.ok(now >= durable && now < durable + want + 32, `what was durable stays (${durable} → ${now})`);
    assert.ok(chunksOut() - wireBefore >= now - durable, 'nothing counted that did not travel');
    durable = now;
  }
  // The job's own counters go with the job when the check-out ends: the rerun is counted in bytes on the wire (random chunks: 256 KiB each and a few bytes).
  const bytesBefore = broker.transfer!.stats.bytesOut;
  const done = await checkout(env(home), 'resume');
  const missing = total - durable;
  assert.equal(done.chunksMoved, missing, `the rerun fetches only the ${missing} chunks not yet durable`);
  const wire = broker.transfer!.stats.bytesOut - bytesBefore;
  // Each chunk is 256 KiB and its envelope and frame (measured ≈ 1.8 KiB): a bound per chunk, not one spare chunk in all (153 missing chunks outgrew that).
  assert.ok(wire >= missing * CHUNK && wire < missing * (CHUNK + 4096), `${wire} bytes on the wire for ${missing} chunks`);
  assert.ok((await readDesktop(env(home), 'resume')).equals(await serverDisk('resume')), `byte-identical after ${points.length} kills`);
  await release(env(home), 'resume', 'rollback');
});

test('--limit-rate holds for the download `serve` takes over (remembered from the check-out), and a policy bound caps a user who asks for more', async () => {
  const cap = 1024 * 1024;
  const image = makeImage(broker.dir, 8, 'rate.raw'); // 16 random chunks of 256 KiB: 4 MiB to move
  for (const name of ['rate', 'rate-bound']) {
    const r = await http.call('POST', '/v1/admin/desktops', { name, image, config: { vcpus: 1, ramMiB: 512, minRamMiB: 256 } }, admin);
    assert.equal(r.status, 201, JSON.stringify(r.body));
    await http.call('POST', '/v1/admin/entitlements', { principalType: 'user', principal: 'alice', targetType: 'desktop', target: name }, admin);
  }
  const home = join(broker.dir, 'laptop-rate');
  await enroll(env(home), broker.url, { fingerprint: broker.fingerprint, name: 'laptop-rate' });
  // The check-out under --limit-rate stops after 2 chunks; `serve` (no --limit-rate of its own) continues the download.
  const abort = new AbortController();
  await assert.rejects(checkout({ ...env(home), rateLimit: new RateLimiter(cap), signal: abort.signal, onProgress: (_l, p) => p.chunksDone >= 2 && abort.abort() }, 'rate'));
  const bytesBefore = broker.transfer!.stats.bytesOut;
  const started = performance.now();
  const served = await serveDesktop(env(home), 'rate');
  try {
    while ((await status(env(home), 'rate'))[0]!.state !== 'checked_out') await new Promise((r) => setTimeout(r, 50));
  } finally {
    await served.close();
  }
  const secs = (performance.now() - started) / 1000;
  const moved = broker.transfer!.stats.bytesOut - bytesBefore;
  // A lower bound only: the bucket allows a one-second burst, the rest goes at the cap at most.
  assert.ok(moved > 2 * CHUNK, `serve moved the rest (${moved} bytes)`);
  assert.ok(secs >= ((moved - cap) / cap) * 0.8, `${moved} bytes in ${secs.toFixed(2)} s: the remembered ${cap} B/s held`);
  // The base `serve` completed is whole and not taken for damaged (its file was read under QEMU's unflushed tables before).
  const [st] = await status(env(home), 'rate');
  assert.deepEqual([st!.problem, st!.safeOffline], [null, true]);
  assert.ok((await readDesktop(env(home), 'rate')).equals(await serverDisk('rate')), 'the continued check-out is byte-identical to the snapshot');
  await release(env(home), 'rate', 'rollback');

  // The administrator's bound: a user asking for 100 MiB/s gets 1024 KiB/s (timed from the first chunk to the last: no fixed costs).
  await http.call('PUT', '/v1/admin/policies/desktop/rate-bound', { maxTransferRateKBps: 1024 }, admin);
  let first: { at: number; bytes: number } | null = null;
  let last = { at: 0, bytes: 0 };
  await checkout({ ...env(home), rateLimit: new RateLimiter(100 * cap), onProgress: (_l, p) => {
    last = { at: performance.now(), bytes: p.bytesDone };
    first ??= last;
  } }, 'rate-bound');
  const span = (last.at - first!.at) / 1000;
  const bytes = last.bytes - first!.bytes;
  assert.ok(bytes > 2 * cap && span >= ((bytes - cap) / cap) * 0.8, `${bytes} bytes in ${span.toFixed(2)} s under the policy's 1024 KiB/s`);
  await release(env(home), 'rate-bound', 'rollback');
});
