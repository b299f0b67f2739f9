// Runs node's own test runner over every compiled *.test.js under dist/test (Node 20's
// `node --test <dir>` would also execute helper modules). Extra args filter by path substring.
import { spawnSync } from 'node:child_process';
import { mkdtempSync, readdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

function walk(dir) {
  return readdirSync(dir, { withFileTypes: true }).flatMap((e) =>
    e.isDirectory() ? walk(join(dir, e.name)) : e.name.endsWith('.test.js') ? [join(dir, e.name)] : [],
  );
}

const filters = process.argv.slice(2);
const files = walk('dist/test')
  .filter((f) => filters.length === 0 || filters.some((s) => f.includes(s)))
  .sort();
if (files.length === 0) {
  console.error('no test files matched');
  process.exit(1);
}
// NODE_ENV=test lets the suite lower the vault KDF cost (CARRYON_SCRYPT_N); production refuses it.
// One test file at a time: the swtpm, QEMU-guest and LUKS-creation tests flaked when two heavy files shared the 2 cores.
// Laptops made by the tests share one directory of layer templates (each costs QEMU ≈ 2 s of PBKDF benchmark).
const templates = mkdtempSync(join(tmpdir(), 'carryon-templates-'));
const res = spawnSync(process.execPath, ['--test', '--test-concurrency=1', '--test-timeout=300000', ...files], { stdio: 'inherit', env: { ...process.env, NODE_ENV: 'test', CARRYON_TEMPLATE_DIR: templates } });
rmSync(templates, { recursive: true, force: true });
process.exit(res.status ?? 1);
