// Bundles the `carryon` launcher (dist/src/cli/main.js, tsc's output) in place, after tsc.
//
// Why: every command paid ≈ 210 ms of Node's module loader before its first line ran (our 140
// modules, zod's 95 ES modules, undici's 100 CommonJS files: resolution, reads, compiles), which
// was a third of a one-chunk check-in. One bundle with the four packages the CLI loads on every
// command (zod, undici, commander, cli-progress) starts in ≈ 110 ms less. Servers' and native
// packages stay as installed (`npm ci`), reached through the lazy imports as before.
//
// Only the launcher is bundled: tests and other modules import dist/src as tsc wrote it, and the
// worker threads (XTS writers, sealers) load their own files. Code that finds files next to its
// own module (`new URL('./x.js', import.meta.url)`: workers, the print relay, package.json) gets
// its original module's URL back, so it resolves as before.
import { build } from 'esbuild';
import { readFile, readdir, rm } from 'node:fs/promises';
import { dirname, join, relative } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const outDir = join(root, 'dist/src/cli');
const entry = join(outDir, 'main.js');
const MARK = '// carryon: bundled launcher';
const CHUNK_PREFIX = 'main-chunk-';
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
for (const name of await readdir(outDir)) if (name.startsWith(CHUNK_PREFIX)) await rm(join(outDir, name));
// tsc's map of the unbundled launcher would point stack traces at the wrong lines.
await rm(`${entry}.map`, { force: true });

const keepModuleUrl = {
  name: 'keep-module-url',
  setup(b) {
    b.onLoad({ filter: /[/\\]dist[/\\]src[/\\].*\.js$/ }, async (args) => {
      const text = await readFile(args.path, 'utf8');
      if (!text.includes('import.meta.url')) return { contents: text, loader: 'js' };
      const own = relative(outDir, args.path).split('\\').join('/');
      return { contents: text.replaceAll('import.meta.url', `new URL(${JSON.stringify(own)}, import.meta.url).href`), loader: 'js' };
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

await build({
  entryPoints: [entry],
  outdir: outDir,
  allowOverwrite: true,
  bundle: true,
  splitting: true, // the servers' code (lazy imports) in chunks of their own, loaded only by their commands
  chunkNames: `${CHUNK_PREFIX}[hash]`,
  platform: 'node',
  format: 'esm',
  target: 'node20',
  external,
  // CommonJS packages inside an ES module bundle still call require() for Node's built-ins.
  banner: { js: `${MARK}\nimport { createRequire as __carryonRequire } from 'node:module';\nconst require = __carryonRequire(import.meta.url);` },
  logLevel: 'warning',
  plugins: [keepModuleUrl, undiciSlim],
});
