import { existsSync, readdirSync, readFileSync } from 'node:fs';
import { extname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import type { FastifyPluginAsync } from 'fastify';

const TYPES: Record<string, string> = {
  '.html': 'text/html; charset=utf-8', '.js': 'text/javascript; charset=utf-8', '.css': 'text/css; charset=utf-8',
  '.svg': 'image/svg+xml', '.png': 'image/png', '.ico': 'image/x-icon', '.json': 'application/json', '.woff2': 'font/woff2',
};
const SECURITY_HEADERS = {
  'content-security-policy': "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
  'x-content-type-options': 'nosniff',
  'referrer-policy': 'no-referrer',
};

/** Where `npm run build` puts the console (dist/web, beside dist/src). */
export function consoleDir(): string {
  return fileURLToPath(new URL('../../../web/', import.meta.url));
}

/**
 * The admin web console: static files (built by Vite from web/) on the broker's HTTPS port, and
 * nothing else: the page talks only to the documented API, registered with its resources.
 */
export const consoleRoutes: FastifyPluginAsync<{ webDir?: string }> = async (app, opts) => {
  const dir = opts.webDir ?? consoleDir();
  const files = new Map<string, { body: Buffer; type: string }>();
  const load = (rel: string) => files.set(`/${rel}`, { body: readFileSync(join(dir, rel)), type: TYPES[extname(rel)] ?? 'application/octet-stream' });
  if (existsSync(join(dir, 'index.html'))) {
    load('index.html');
    for (const sub of ['assets']) if (existsSync(join(dir, sub))) for (const f of readdirSync(join(dir, sub))) load(`${sub}/${f}`);
    for (const f of readdirSync(dir)) if (f !== 'index.html' && extname(f) && !files.has(`/${f}`)) load(f);
  }
  const index = files.get('/index.html');
  app.get('/', async (_req, reply) => {
    if (!index) return reply.status(404).type('text/plain').send('the web console is not built (run `npm run build`)');
    return reply.headers(SECURITY_HEADERS).header('cache-control', 'no-cache').type(index.type).send(index.body);
  });
  app.get('/assets/:file', async (req, reply) => {
    const f = files.get(`/assets/${(req.params as { file: string }).file}`);
    if (!f) return reply.status(404).send({ error: 'not-found', message: 'no such file' });
    // File names carry a content hash: cache them for good.
    return reply.headers(SECURITY_HEADERS).header('cache-control', 'public, max-age=31536000, immutable').type(f.type).send(f.body);
  });
  for (const [path, f] of files) {
    if (path === '/index.html' || path.startsWith('/assets/')) continue;
    app.get(path, async (_req, reply) => reply.headers(SECURITY_HEADERS).type(f.type).send(f.body));
  }
};
