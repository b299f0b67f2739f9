import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { promisify } from 'node:util';

const run = promisify(execFile);
const MAIN = fileURLToPath(new URL('../../src/cli/main.js', import.meta.url));
const ROOT = fileURLToPath(new URL('../../../', import.meta.url));

/** Every module file the launcher loads for `args`, as paths (a module loader hook records them). */
async function modulesLoaded(args: string[]): Promise<{ files: string[]; stdout: string }> {
  const dir = await mkdtemp(join(tmpdir(), 'carryon-launcher-'));
  try {
    const log = join(dir, 'loaded.txt');
    const hooks = join(dir, 'hooks.mjs');
    await writeFile(hooks, `import { appendFileSync } from 'node:fs';\nexport async function load(url, context, next) { if (url.startsWith('file:')) appendFileSync(${JSON.stringify(log)}, url + '\\n'); return next(url, context); }\n`);
    const register = join(dir, 'register.mjs');
    await writeFile(register, `import { register } from 'node:module';\nregister(${JSON.stringify(pathToFileURL(hooks).href)});\n`);
    // CommonJS requires inside a package do not pass the ES loader's hook; its entry file does.
    const { stdout } = await run(process.execPath, ['--import', pathToFileURL(register).href, MAIN, ...args]);
    const files = (await readFile(log, 'utf8')).split('\n').filter(Boolean).map((u) => fileURLToPath(u));
    return { files, stdout };
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

test('the launcher is one bundle: no package the CLI needs on every command is loaded file by file', async () => {
  const { files, stdout } = await modulesLoaded(['--version']);
  const pkg = JSON.parse(await readFile(join(ROOT, 'package.json'), 'utf8')) as { version: string };
  // The bundled code still finds package.json next to its original module (scripts/bundle-cli.mjs).
  assert.equal(stdout.trim(), pkg.version);
  // Native addons (zstd-napi) and the servers' packages stay as installed.
  const bundled = files.filter((f) => /\/node_modules\/(zod|undici|commander|cli-progress)\//.test(f));
  assert.deepEqual(bundled, [], 'zod, undici, commander and cli-progress are in the bundle');
  const ours = files.filter((f) => f.startsWith(join(ROOT, 'dist')));
  assert.ok(ours.includes(MAIN));
  assert.ok(ours.every((f) => f === MAIN || /\/dist\/src\/cli\/main-chunk-[A-Z0-9]+\.js$/.test(f)), `only the bundle's files: ${ours.filter((f) => f !== MAIN).slice(0, 3).join(', ')}`);
});
