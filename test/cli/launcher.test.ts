import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { mkdtemp, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { test } from 'node:test';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { promisify } from 'node:util';
import { NODE_FLAGS } from '../../src/core/runtime/node-flags.js';

const run = promisify(execFile);
/** The `carryon` bin (package.json); main.js, the entry older launchers name, runs it. */
const LAUNCHER = fileURLToPath(new URL('../../src/cli/carryon.cjs', import.meta.url));
const MAIN = fileURLToPath(new URL('../../src/cli/main.js', import.meta.url));
const ROOT = fileURLToPath(new URL('../../../', import.meta.url));

/** Every module file the launcher loads for `args`, as paths: ES modules (a loader hook) and CommonJS ones (a preload watching `require`). */
async function modulesLoaded(args: string[], env: NodeJS.ProcessEnv = process.env, entry = LAUNCHER): Promise<{ files: string[]; builtins: string[]; stdout: string; stderr: string }> {
  const dir = await mkdtemp(join(tmpdir(), 'carryon-launcher-'));
  try {
    const log = join(dir, 'loaded.txt');
    const hooks = join(dir, 'hooks.mjs');
    await writeFile(hooks, `import { appendFileSync } from 'node:fs';\nexport async function load(url, context, next) { if (url.startsWith('file:')) appendFileSync(${JSON.stringify(log)}, url + '\\n'); return next(url, context); }\n`);
    const register = join(dir, 'register.mjs');
    await writeFile(register, `import { register } from 'node:module';\nregister(${JSON.stringify(pathToFileURL(hooks).href)});\n`);
    // The bundle is CommonJS: what it requires passes Module._load, not the ES loader's hook.
    const preload = join(dir, 'preload.cjs');
    // Node's own modules the command loaded, at its exit.
    const builtinLog = join(dir, 'builtins.txt');
    await writeFile(preload, `const Module = require('node:module'); const { appendFileSync, writeFileSync } = require('node:fs'); const { pathToFileURL } = require('node:url');\nconst load = Module._load; Module._load = function (request, parent, isMain) { try { const f = Module._resolveFilename(request, parent, isMain); if (f.startsWith('/')) appendFileSync(${JSON.stringify(log)}, pathToFileURL(f).href + '\\n'); } catch {} return load.apply(this, arguments); };\nprocess.on('exit', () => writeFileSync(${JSON.stringify(builtinLog)}, process.moduleLoadList.filter((m) => m.startsWith('NativeModule ')).map((m) => m.slice(13)).join('\\n')));\n`);
    const { stdout, stderr } = await run(process.execPath, [...NODE_FLAGS, '--require', preload, '--import', pathToFileURL(register).href, entry, ...args], { env });
    // A main entry is seen by both the hook and the preload.
    const files = [...new Set((await readFile(log, 'utf8')).split('\n').filter(Boolean).map((u) => fileURLToPath(u)))];
    const builtins = (await readFile(builtinLog, 'utf8')).split('\n');
    return { files, builtins, stdout, stderr };
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

test('the launcher is one bundle: no package the CLI needs on every command is loaded file by file', async () => {
  const { files, builtins, stdout } = await modulesLoaded(['--version']);
  const pkg = JSON.parse(await readFile(join(ROOT, 'package.json'), 'utf8')) as { version: string };
  // The bundled code still finds package.json next to its original module (scripts/bundle-cli.mjs).
  assert.equal(stdout.trim(), pkg.version);
  // Native addons (zstd-napi) and the servers' packages stay as installed.
  const bundled = files.filter((f) => /\/node_modules\/(zod|undici|commander|cli-progress)\//.test(f));
  assert.deepEqual(bundled, [], 'zod, undici, commander and cli-progress are in the bundle');
  const ours = files.filter((f) => f.startsWith(join(ROOT, 'dist')));
  assert.deepEqual(ours, [LAUNCHER], 'only the launcher is loaded as a module (it compiles main.cjs itself)');
  // What undici loads at its top level and Carryon never or rarely uses waits until used (LAZY_UNDICI in scripts/bundle-cli.mjs).
  for (const unused of ['http2', 'http', 'perf_hooks']) assert.ok(!builtins.includes(unused), `node:${unused} is loaded at start`);
  assert.ok(builtins.includes('tls') && builtins.includes('crypto'), 'the list is read');
});

test('main.js, the entry older launchers name, runs the same launcher', async () => {
  const { files, stdout } = await modulesLoaded(['--version'], process.env, MAIN);
  const pkg = JSON.parse(await readFile(join(ROOT, 'package.json'), 'utf8')) as { version: string; bin: Record<string, string> };
  assert.equal(stdout.trim(), pkg.version);
  assert.deepEqual(files.filter((f) => f.startsWith(join(ROOT, 'dist'))).sort(), [LAUNCHER, MAIN].sort());
  assert.equal(join(ROOT, pkg.bin.carryon!), LAUNCHER, 'the bin is the CommonJS launcher');
});

test('the launcher compiles the bundle with the code cache made at build time, under the flags it runs with', async () => {
  const { stderr } = await modulesLoaded(['--version'], { ...process.env, CARRYON_TRACE: '1' });
  assert.match(stderr, /^carryon-trace compile [\d.]+ [\d.]+$/m, `the cache was not taken: ${stderr}`);
  // The cache is only ever written by the build.
  const cache = join(dirname(MAIN), 'main.cjs.cache');
  const before = await stat(cache);
  await run(process.execPath, [...NODE_FLAGS, LAUNCHER, '--version']);
  assert.equal((await stat(cache)).mtimeMs, before.mtimeMs);
});

test('a bundle changed since its cache was made (even to the same length, which V8 alone would not notice) is compiled without it', async () => {
  const cli = dirname(LAUNCHER);
  const name = `main-copy-${process.pid}`;
  const launcher = join(cli, `${name}-launcher.cjs`);
  const bundle = join(cli, `${name}.cjs`);
  try {
    const text = await readFile(LAUNCHER, 'utf8');
    assert.ok(text.includes("'main.cjs'"));
    await writeFile(launcher, text.replace("'main.cjs'", `'${name}.cjs'`));
    const code = await readFile(join(cli, 'main.cjs'), 'utf8');
    await writeFile(bundle, code);
    await writeFile(`${bundle}.cache`, await readFile(join(cli, 'main.cjs.cache')));
    const env = { ...process.env, CARRYON_TRACE: '1' };
    const same = await run(process.execPath, [...NODE_FLAGS, launcher, '--version'], { env });
    assert.match(same.stderr, /^carryon-trace compile [\d.]+ [\d.]+$/m, 'the same bytes take the cache');
    // One character of the bundle's first line (a comment) changed: same length, other bytes.
    assert.ok(code.startsWith('//#!/usr/bin/env'));
    await writeFile(bundle, code.replace('//#!/usr/bin/env', '//#!/usr/bin/enV'));
    const changed = await run(process.execPath, [...NODE_FLAGS, launcher, '--version'], { env });
    assert.match(changed.stderr, /^carryon-trace compile-without-cache [\d.]+ [\d.]+$/m, `a changed bundle is compiled afresh: ${changed.stderr}`);
    assert.equal(changed.stdout.trim(), same.stdout.trim());
  } finally {
    for (const f of [launcher, bundle, `${bundle}.cache`]) await rm(f, { force: true });
  }
});
