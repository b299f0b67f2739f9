// Bundles the `carryon` launcher (dist/src/cli/main.js, tsc's output) in place, after tsc.
//
// Why: every command paid ≈ 210 ms of Node's module loader before its first line ran (our 140
// modules, zod's 95 ES modules, undici's 100 CommonJS files: resolution, reads, compiles), which
// was a third of a one-chunk check-in. One bundle with the four packages the CLI loads on every
// command (zod, undici, commander, cli-progress) starts in ≈ 110 ms less. Servers' and native
// packages stay as installed (`npm ci`), required where they are used, as before.
//
// The bundle is CommonJS (main.cjs), run by a small launcher (main.js) through `vm.Script` with
// the V8 code cache made here (main.cjs.cache): Node 20 has no compile cache for ES modules, and
// compiling the launcher's code on every command cost ≈ 25–40 ms. The cache is made by running
// `carryon --version` with the launcher's own V8 flags (a cache made under other flags is
// refused by V8, and the bundle is then compiled as usual); it is never written at run time. V8
// compares a cache with its source's length only: the cache file carries the bundle's SHA-256.
//
// Only the launcher is bundled: tests and other modules import dist/src as tsc wrote it, and the
// worker threads (XTS writers, sealers) load their own files. Code that finds files next to its
// own module (`new URL('./x.js', import.meta.url)`: workers, the print relay, package.json) gets
// its original module's URL back, so it resolves as before.
import { execFileSync } from 'node:child_process';
import { build } from 'esbuild';
import { chmod, readFile, rm, writeFile } from 'node:fs/promises';
import { dirname, join, relative } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const outDir = join(root, 'dist/src/cli');
const entry = join(outDir, 'main.js');
const MARK = '// carryon: bundled launcher';
const BUNDLED = ['zod', 'undici', 'commander', 'cli-progress'];

const pkg = JSON.parse(await readFile(join(root, 'package.json'), 'utf8'));
const external = Object.keys(pkg.dependencies).filter((name) => !BUNDLED.includes(name));
for (const name of BUNDLED) if (!(name in pkg.dependencies)) throw new Error(`bundle-cli: ${name} is no longer a dependency`);

const source = await readFile(entry, 'utf8').catch(() => {
  throw new Error(`bundle-cli: ${entry} is missing: run tsc first (npm run build)`);
});
if (source.includes(MARK)) {
  console.log('bundle-cli: dist/src/cli/main.js is already bundled (run tsc again to rebuild it)');
  process.exit(0);
}
// tsc's map of the unbundled launcher would point stack traces at the wrong lines.
await rm(`${entry}.map`, { force: true });

const keepModuleUrl = {
  name: 'keep-module-url',
  setup(b) {
    b.onLoad({ filter: /[/\\]dist[/\\]src[/\\].*\.js$/ }, async (args) => {
      const text = await readFile(args.path, 'utf8');
      if (!text.includes('import.meta.url')) return { contents: text, loader: 'js' };
      const own = relative(outDir, args.path).split('\\').join('/');
      return { contents: text.replaceAll('import.meta.url', `require('node:url').pathToFileURL(require('node:path').join(__dirname, ${JSON.stringify(own)})).href`), loader: 'js' };
    });
  },
};

// What Carryon imports from undici, without its index (fetch, WebSocket, mocks: scripts/undici-slim.cjs).
const undiciSlim = {
  name: 'undici-slim',
  setup(b) {
    b.onResolve({ filter: /^undici$/ }, () => ({ path: join(root, 'scripts/undici-slim.cjs') }));
  },
};

// Node's own modules that undici loads at its top level and a command uses rarely or never: node:http2
// (HTTP/2, which Carryon does not speak) and node:http (a default read once per client, the class of
// a body stream to destroy): ≈ 18 ms of every command's start here. Each edit must find its text:
// an undici that changed them fails the build instead of bundling unpatched.
const LAZY_UNDICI = {
  'lib/dispatcher/client.js': [
    ["const http = require('node:http')\n", ''],
    ["const connectH2 = require('./client-h2.js')", "const connectH2 = (client, socket) => require('./client-h2.js')(client, socket)"],
    [
      "const getDefaultNodeMaxHeaderSize = http &&\n  http.maxHeaderSize &&\n  Number.isInteger(http.maxHeaderSize) &&\n  http.maxHeaderSize > 0\n  ? () => http.maxHeaderSize\n  : () => { throw new InvalidArgumentError('http module not available or http.maxHeaderSize invalid') }",
      "const getDefaultNodeMaxHeaderSize = () => {\n  const { maxHeaderSize } = require('node:http')\n  if (Number.isInteger(maxHeaderSize) && maxHeaderSize > 0) return maxHeaderSize\n  throw new InvalidArgumentError('http module not available or http.maxHeaderSize invalid')\n}",
    ],
  ],
  'lib/core/util.js': [
    ["const { IncomingMessage } = require('node:http')\n", ''],
    // Every response body's end comes here: node:http is loaded only for a stream that may be one of its own.
    ['if (Object.getPrototypeOf(stream).constructor === IncomingMessage) {', "if (Object.getPrototypeOf(stream).constructor?.name === 'IncomingMessage' && Object.getPrototypeOf(stream).constructor === require('node:http').IncomingMessage) {"],
  ],
};
const undiciLazy = {
  name: 'undici-lazy',
  setup(b) {
    b.onLoad({ filter: /[/\\]node_modules[/\\]undici[/\\]lib[/\\](dispatcher[/\\]client|core[/\\]util)\.js$/ }, async (args) => {
      const key = args.path.split('\\').join('/').replace(/^.*\/node_modules\/undici\//, '');
      let text = await readFile(args.path, 'utf8');
      for (const [from, to] of LAZY_UNDICI[key] ?? []) {
        if (text.split(from).length !== 2) throw new Error(`bundle-cli: undici's ${key} no longer holds ${JSON.stringify(from.slice(0, 60))} once: review LAZY_UNDICI`);
        text = text.replace(from, to);
      }
      return { contents: text, loader: 'js' };
    });
  },
};

const bundle = join(outDir, 'main.cjs');
await build({
  entryPoints: [entry],
  outfile: bundle,
  allowOverwrite: true,
  bundle: true,
  platform: 'node',
  format: 'cjs',
  charset: 'ascii',
  target: 'node20',
  external,
  logLevel: 'warning',
  plugins: [keepModuleUrl, undiciSlim, undiciLazy],
});

// The launcher's shebang (its V8 flags: src/core/runtime/node-flags.ts) moves to the launcher; the bundle runs inside a function.
const shebang = source.split('\n', 1)[0];
if (!shebang.startsWith('#!')) throw new Error('bundle-cli: dist/src/cli/main.js has no shebang line');
// `#!/usr/bin/env -S NAME=value … node FLAG …`: the environment, then Node's flags.
const launch = /^#!\/usr\/bin\/env -S ((?:[A-Z_]+=\S+\s+)*)node\s*(.*)$/.exec(shebang);
if (!launch) throw new Error(`bundle-cli: unexpected shebang ${shebang}`);
const launchEnv = Object.fromEntries(launch[1].split(/\s+/).filter(Boolean).map((a) => [a.slice(0, a.indexOf('=')), a.slice(a.indexOf('=') + 1)]));
const flags = launch[2].split(/\s+/).filter(Boolean);
let code = await readFile(bundle, 'utf8');
if (code.startsWith('#!')) code = `//${code}`;
// The launcher reads the bundle as Latin-1, a copy (decoding 2.7 MB as UTF-8 cost ≈ 10 ms more of every
// start here): it must be ASCII. esbuild escapes non-ASCII in code (charset 'ascii'); what is left is in
// comments (ours: "≈", "→"; the licences'), which keep a "?" for each such character.
code = code.replace(/[^\x00-\x7f]/g, '?');
await writeFile(bundle, code);

// The launcher proper is CommonJS (carryon.cjs, the `carryon` bin): an ES module entry costs Node ≈ 10 ms
// more to start (its loader). main.js, the entry older launchers and scripts name, loads the same one.
const launcher = join(outDir, 'carryon.cjs');
await writeFile(launcher, `${shebang}
${MARK} (scripts/bundle-cli.mjs): the CLI is main.cjs, compiled with the V8 code cache made at build time.
'use strict';
const { createHash } = require('node:crypto');
const { readFileSync, writeFileSync } = require('node:fs');
const { join } = require('node:path');
const vm = require('node:vm');

const file = join(__dirname, 'main.cjs');
const bytes = readFileSync(file);
// V8 checks a cache against its source's length only: the cache file starts with the SHA-256 of
// the bundle it was made from, and is used only for that bundle. The build writes it
// (CARRYON_CODE_CACHE_OUT); a run only reads it, and V8 still refuses one made for another V8 or flags.
const digest = createHash('sha256').update(bytes).digest();
const out = process.env.CARRYON_CODE_CACHE_OUT;
let cachedData;
if (!out) {
  try {
    const cache = readFileSync(\`\${file}.cache\`);
    if (cache.subarray(0, 32).equals(digest)) cachedData = cache.subarray(32);
  } catch {
    cachedData = undefined;
  }
}
// CARRYON_TRACE=1: how long the compile took (ms since the process started), named for whether V8 took the cache (test/cli/launcher.test.ts).
const tracing = process.env.CARRYON_TRACE === '1';
const started = tracing ? process.uptime() * 1000 : 0;
// The build made the bundle ASCII: Latin-1 is the same text, read without UTF-8's decoding.
const script = new vm.Script(\`(function (exports, require, module, __filename, __dirname) {\${bytes.toString('latin1')}\\n})\`, { filename: file, cachedData, importModuleDynamically: vm.constants?.USE_MAIN_CONTEXT_DEFAULT_LOADER });
if (tracing) process.stderr.write(\`carryon-trace \${cachedData && !script.cachedDataRejected ? 'compile' : 'compile-without-cache'} \${started.toFixed(1)} \${(process.uptime() * 1000 - started).toFixed(1)}\\n\`);
if (out) process.once('exit', () => writeFileSync(out, Buffer.concat([digest, script.createCachedData()])));
const bundled = { exports: {} };
script.runInThisContext()(bundled.exports, require('node:module').createRequire(file), bundled, file, __dirname);
`);
await writeFile(entry, `${shebang}
${MARK}: the CLI is carryon.cjs (scripts/bundle-cli.mjs); this entry, for whatever names main.js, runs it.
import { createRequire } from 'node:module';

createRequire(import.meta.url)('./carryon.cjs');
`);
for (const f of [launcher, entry]) await chmod(f, 0o755);

// The cache: the launcher's startup (every module's top level, the commands' registration) compiled.
await rm(`${bundle}.cache`, { force: true });
execFileSync(process.execPath, [...flags, launcher, '--version'], { env: { ...process.env, ...launchEnv, CARRYON_CODE_CACHE_OUT: `${bundle}.cache` }, stdio: ['ignore', 'ignore', 'inherit'] });
