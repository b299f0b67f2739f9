// Runs node's own test runner over every compiled *.test.js under dist/test (Node 20's
// `node --test <dir>` would also execute helper modules). Extra args filter by path substring.
//
// Engines: `--both` (what `npm test` does) runs every file with brokers on SQLite, then the files
// that start brokers or use the broker's database again with each broker on a fresh PostgreSQL
// database (a throwaway cluster started here). Without it one pass runs, on the engine that
// CARRYON_TEST_DATABASE names (sqlite, the default, or postgres).
import { spawnSync } from 'node:child_process';
import { mkdtempSync, readdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

function walk(dir) {
  return readdirSync(dir, { withFileTypes: true }).flatMap((e) =>
    e.isDirectory() ? walk(join(dir, e.name)) : e.name.endsWith('.test.js') ? [join(dir, e.name)] : [],
  );
}

// What a PostgreSQL pass runs: everything that starts a broker or touches its database.
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

function pass(list, env) {
  // NODE_ENV=test lets the suite lower the vault KDF cost (CARRYON_SCRYPT_N); production refuses it.
  // One test file at a time: the swtpm, QEMU-guest and LUKS-creation tests flaked when two heavy files shared the 2 cores.
  const t0 = Date.now();
  const res = spawnSync(process.execPath, ['--test', '--test-concurrency=1', '--test-timeout=300000', ...list], { stdio: 'inherit', env: { ...process.env, NODE_ENV: 'test', CARRYON_TEMPLATE_DIR: templates, ...env } });
  console.log(`# pass on ${env.CARRYON_TEST_DATABASE}: ${list.length} files, ${((Date.now() - t0) / 1000).toFixed(0)} s, exit ${res.status}`);
  return res.status ?? 1;
}

async function onPostgres(list) {
  const { startPostgres } = await import('../dist/test/support/postgres.js');
  const cluster = await startPostgres();
  const stop = () => cluster.stopNow();
  process.once('SIGINT', () => (stop(), process.exit(130)));
  process.once('SIGTERM', () => (stop(), process.exit(143)));
  try {
    return pass(list, { CARRYON_TEST_DATABASE: 'postgres', CARRYON_TEST_PG_URL: cluster.url });
  } finally {
    await cluster.stop();
  }
}

let status;
if (both) {
  const first = pass(files, { CARRYON_TEST_DATABASE: 'sqlite' });
  const pgFiles = files.filter((f) => POSTGRES_PARTS.some((p) => f.includes(p)));
  const second = pgFiles.length ? await onPostgres(pgFiles) : 0;
  status = first || second;
} else if (process.env.CARRYON_TEST_DATABASE === 'postgres') {
  status = await onPostgres(files);
} else {
  status = pass(files, { CARRYON_TEST_DATABASE: 'sqlite' });
}
process.exit(status);
