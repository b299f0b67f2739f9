import assert from 'node:assert/strict';
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { after, before, test } from 'node:test';
import { makeImage } from '../broker/harness.js';
import { freshBucket, testSwift, type SwiftEndpoint } from '../support/swift.js';
import { testDatabase } from '../support/postgres.js';

const run = promisify(execFile);
const CLI = join(process.cwd(), 'dist', 'src', 'cli', 'main.js');
const dir = mkdtempSync(join(tmpdir(), 'carryon-s3cli-'));
let swift: SwiftEndpoint;
const bucket = freshBucket();
let server: ChildProcess;
let env: NodeJS.ProcessEnv;

before(async () => {
  swift = await testSwift();
  // Credentials the usual AWS way (environment), never in the store URL.
  const base = { ...process.env, AWS_ACCESS_KEY_ID: swift.accessKeyId, AWS_SECRET_ACCESS_KEY: swift.secretAccessKey, AWS_REGION: swift.region, CARRYON_ADMIN_PASSWORD: 'admin-password-1' };
  const store = `s3://${bucket}/dc1?endpoint=${encodeURIComponent(swift.endpoint)}&create=true`;
  // A PostgreSQL run puts the server's metadata (and so the S3 pack index) in a fresh database.
  const database = await testDatabase();
  server = spawn(process.execPath, [CLI, 'server', '--data-dir', join(dir, 'srv'), '--port', '0', '--chunk-store', store, '--import-dir', dir, '--init-admin', 'admin', ...(database ? ['--database', database] : [])], { env: base, stdio: ['ignore', 'pipe', 'pipe'], detached: true });
  let out = '';
  await new Promise<void>((resolve, reject) => {
    const t = setTimeout(() => reject(new Error(`server did not start: ${out}`)), 30_000);
    const on = (b: Buffer) => {
      out += b.toString();
      if (out.includes(`chunk store: s3://${bucket}/dc1\n`) && /fingerprint \(SHA-256\): [0-9a-f]{64}/.test(out)) (clearTimeout(t), resolve());
    };
    server.stdout!.on('data', on);
    server.stderr!.on('data', on);
    server.once('exit', (code) => (clearTimeout(t), reject(new Error(`server exited (${code}): ${out}`))));
  });
  assert.doesNotMatch(out, /testing|tester/, 'no credentials printed');
  env = { ...base, CARRYON_URL: /listening on (\S+)/.exec(out)![1]!, CARRYON_FINGERPRINT: /SHA-256\): ([0-9a-f]{64})/.exec(out)![1]!, CARRYON_USER: 'admin', CARRYON_PASSWORD: 'admin-password-1' };
});
after(async () => {
  if (server?.pid && server.exitCode === null) {
    const exited = new Promise((r) => server.once('exit', r));
    process.kill(-server.pid, 'SIGKILL');
    await exited;
  }
  rmSync(dir, { recursive: true, force: true });
});

const carryon = (args: string[]) => run(process.execPath, [CLI, ...args], { env, maxBuffer: 16 << 20 });

test('carryon server --chunk-store s3://… imports into Swift; admin gc --dry-run and admin verify report', async () => {
  const image = makeImage(dir, 4);
  const created = await carryon(['admin', 'desktops', 'create', 'win', image]);
  assert.match(created.stdout, /desktop win .*8 chunks stored/);
  const dry = await carryon(['admin', 'gc', '--dry-run', '--grace-hours', '0']);
  assert.match(dry.stdout, /dry run: nothing changed/);
  assert.match(dry.stdout, /snapshots: 1 kept, 0 to delete/);
  assert.match(dry.stdout, /8 referenced/);
  const gc = await carryon(['admin', 'gc', '--grace-hours', '0', '--json']);
  const report = JSON.parse(gc.stdout) as { blobs: { referenced: number; swept: number } };
  assert.deepEqual([report.blobs.referenced, report.blobs.swept], [8, 0]);
  const v = await carryon(['admin', 'verify', '--sample', '50%']);
  assert.match(v.stdout, /read 4 of 8 referenced chunks .*: 0 damaged/);
  const ret = await carryon(['admin', 'retention', 'win', '--keep-last', '5', '--keep-replica-days', '7']);
  assert.match(ret.stdout, /win: keep the last 5 snapshots and replicas younger than 7 days/);
  assert.match((await carryon(['admin', 'retention', 'win', '--reset'])).stdout, /each GC run's retention applies/);
  const full = await carryon(['admin', 'verify']);
  assert.match(full.stdout, /read 8 of 8 referenced chunks .*: 0 damaged/);
});
