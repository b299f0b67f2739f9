// Runs node's own test runner over every compiled *.test.js under dist/test (Node 20's
// `node --test <dir>` would also execute helper modules). Extra args filter by path substring.
//
// Engines: `--both` (what `npm test` does) runs every file with brokers on SQLite and local pack
// stores, then the files that start brokers or use the broker's database again on PostgreSQL + S3:
// each broker on a fresh PostgreSQL database (a throwaway cluster started here) and a fresh bucket
// on one OpenStack Swift server (s3api, started here), its pack index in that database. Without it
// one pass runs, on the engine that CARRYON_TEST_DATABASE names: sqlite (the default, local packs)
// or postgres (S3; CARRYON_TEST_STORE=pack keeps local packs, CARRYON_TEST_STORE=s3 puts an SQLite
// pass on S3).
import { spawn } from 'node:child_process';
import { mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

function walk(dir) {
  return readdirSync(dir, { withFileTypes: true }).flatMap((e) =>
    e.isDirectory() ? walk(join(dir, e.name)) : e.name.endsWith('.test.js') ? [join(dir, e.name)] : [],
  );
}

// What the PostgreSQL + S3 pass runs: everything that starts a broker or touches its database.
const POSTGRES_PARTS = ['dist/test/broker/', 'dist/test/e2e/', 'dist/test/transfer/', 'dist/test/web/', 'dist/test/store/metadata'];

const args = process.argv.slice(2);
const both = args.includes('--both');
const filters = args.filter((a) => a !== '--both');
const files = walk('dist/test')
  .filter((f) => filters.length === 0 || filters.some((s) => f.includes(s)))
  .sort();
if (files.length === 0) {
  console.error('no test files matched');
  process.exit(1);
}

// Laptops made by the tests share one directory of layer templates (each costs QEMU ≈ 2 s of PBKDF benchmark).
const templates = mkdtempSync(join(tmpdir(), 'carryon-templates-'));
process.once('exit', () => rmSync(templates, { recursive: true, force: true }));

// Two tiers. Pure and in-process files (no guest, no kill timings, no servers of their own) run two
// at a time; the rest one at a time: the swtpm, QEMU-guest and LUKS-creation tests flaked when two
// heavy files shared the 2 cores. A file joins the serial tier by its folder or by saying
// `carryon-test: serial` in a comment (with why).
const SERIAL_PARTS = ['dist/test/e2e/', 'dist/test/web/', 'dist/test/broker/', 'dist/test/support/', 'dist/test/bench/'];
const says = (file, marker) => readFileSync(file, 'utf8').includes(`carryon-test: ${marker}`);
const isSerial = (file) => SERIAL_PARTS.some((p) => file.includes(p)) || says(file, 'serial');

/** Runs files under node's runner; its output is passed on whole lines only, so two runs at once do not tear each other's lines. */
async function run(files, concurrency, env) {
  // A process group of its own, so an interrupted run takes the test processes (and theirs) with it.
  const child = spawn(process.execPath, ['--test', `--test-concurrency=${concurrency}`, '--test-timeout=300000', ...files], { detached: true, stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, NODE_ENV: 'test', CARRYON_TEMPLATE_DIR: templates, ...env } });
  runners.add(child);
  child.once('exit', () => runners.delete(child));
  for (const [from, to] of [[child.stdout, process.stdout], [child.stderr, process.stderr]]) {
    let rest = '';
    from.setEncoding('utf8');
    from.on('data', (text) => {
      const all = rest + text;
      const cut = all.lastIndexOf('\n') + 1;
      if (cut > 0) to.write(all.slice(0, cut));
      rest = all.slice(cut);
    });
    from.on('end', () => rest && to.write(rest + '\n'));
  }
  return new Promise((resolve) => child.once('close', (c) => resolve(c ?? 1)));
}

/** One engine's files in two tiers; `serialOnly` runs even the light tier one at a time (another pass runs beside it). */
async function pass(list, env, label, { serialOnly = false, betweenTiers } = {}) {
  // NODE_ENV=test lets the suite lower the vault KDF cost (CARRYON_SCRYPT_N); production refuses it.
  const t0 = Date.now();
  const tiers = [[list.filter((f) => !isSerial(f)), serialOnly ? 1 : 2], [list.filter(isSerial), 1]];
  let status = 0;
  for (const [index, [files, concurrency]] of tiers.entries()) {
    if (index === 1) betweenTiers?.();
    if (files.length === 0) continue;
    const t1 = Date.now();
    const code = await run(files, concurrency, env);
    console.log(`# tier on ${label}: ${files.length} files, ${concurrency} at a time, ${((Date.now() - t1) / 1000).toFixed(0)} s, exit ${code}`);
    status ||= code;
  }
  console.log(`# pass on ${label}: ${list.length} files, ${((Date.now() - t0) / 1000).toFixed(0)} s, exit ${status}`);
  return status;
}

// Servers started for a pass and node's test runners (killed at once if we are interrupted).
const servers = new Set();
const runners = new Set();
const stopNow = () => {
  for (const r of runners) {
    try {
      process.kill(-r.pid, 'SIGKILL');
    } catch {} // gone already
  }
  for (const s of servers) {
    try {
      s.stopNow();
    } catch (err) {
      console.error(`# could not stop a test server: ${err}`);
    }
  }
};
process.once('SIGINT', () => (stopNow(), process.exit(130)));
process.once('SIGTERM', () => (stopNow(), process.exit(143)));

/** Starts what an engine needs (a PostgreSQL cluster, a Swift server): the environment its tests read, and a stop. */
async function startEngine(database, store) {
  const env = { CARRYON_TEST_DATABASE: database, CARRYON_TEST_STORE: store };
  const mine = [];
  const stop = () => Promise.all(mine.map((s) => (servers.delete(s), s.stop())));
  const started = await Promise.allSettled([
    database === 'postgres' ? import('../dist/test/support/postgres.js').then((m) => m.startPostgres()) : null,
    store === 's3' ? import('../dist/test/support/swift.js').then((m) => m.startSwift()) : null,
  ]);
  for (const r of started) if (r.status === 'fulfilled' && r.value) (servers.add(r.value), mine.push(r.value));
  const failed = started.find((r) => r.status === 'rejected');
  if (failed) {
    await stop();
    throw failed.reason;
  }
  const [cluster, swift] = started.map((r) => r.value);
  if (cluster) env.CARRYON_TEST_PG_URL = cluster.url;
  if (swift) {
    Object.assign(env, { CARRYON_TEST_S3_ENDPOINT: swift.endpoint, CARRYON_TEST_S3_REGION: swift.region, CARRYON_TEST_S3_ACCESS_KEY_ID: swift.accessKeyId, CARRYON_TEST_S3_SECRET_ACCESS_KEY: swift.secretAccessKey });
  }
  return { env, stop, label: `${database} + ${store === 's3' ? 'S3 (Swift)' : 'local packs'}` };
}

/** One pass on one engine, its servers stopped after. */
async function onEngine(list, database, store, options) {
  const engine = await startEngine(database, store);
  try {
    return await pass(list, engine.env, engine.label, options);
  } finally {
    await engine.stop();
  }
}

const storeFor = (database) => process.env.CARRYON_TEST_STORE ?? (database === 'postgres' ? 's3' : 'pack');
let status;
if (both) {
  // A file whose subject is the laptop or the guest, not the broker's database, says `carryon-test: sqlite-only`.
  const pgFiles = files.filter((f) => POSTGRES_PARTS.some((p) => f.includes(p)) && !says(f, 'sqlite-only'));
  // The PostgreSQL pass runs one file at a time beside the SQLite pass's serial tier: those files mostly wait
  // on one busy core (a TCG guest, a server), so the second core does the other engine's work meanwhile.
  let serialTierBegins;
  const sqliteLightDone = new Promise((resolve) => (serialTierBegins = resolve));
  const first = onEngine(files, 'sqlite', 'pack', { betweenTiers: serialTierBegins });
  const second = pgFiles.length ? sqliteLightDone.then(() => onEngine(pgFiles, 'postgres', 's3', { serialOnly: true })) : Promise.resolve(0);
  status = (await first) || (await second);
} else {
  const database = process.env.CARRYON_TEST_DATABASE === 'postgres' ? 'postgres' : 'sqlite';
  status = await onEngine(files, database, storeFor(database));
}
process.exit(status);
