import { fileURLToPath } from 'node:url';
import { defineConfig } from 'vite';

// The console is plain Preact (JSX through esbuild); `npm run build` writes it to dist/web,
// where the broker serves it.
export default defineConfig({
  root: fileURLToPath(new URL('.', import.meta.url)),
  esbuild: { jsx: 'automatic', jsxImportSource: 'preact' },
  build: { outDir: fileURLToPath(new URL('../dist/web', import.meta.url)), emptyOutDir: true, target: 'es2022', reportCompressedSize: false },
  logLevel: 'warn',
});
