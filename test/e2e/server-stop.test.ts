import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { request } from 'node:https';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import { testDatabase } from '../support/postgres.js';

const CLI = join(process.cwd(), 'dist', 'src', 'cli', 'main.js');

test('SIGTERM stops `carryon server` within seconds though a request is still in flight; the port is free for the restart', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'carryon-stop-'));
  try {
    const database = await testDatabase();
    const server = spawn(process.execPath, [CLI, 'server', '--data-dir', join(dir, 'srv'), '--port', '0', '--init-admin', 'admin', ...(database ? ['--database', database] : [])],
      { env: { ...process.env, CARRYON_ADMIN_PASSWORD: 'admin-password-1' }, stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    server.stdout!.on('data', (b: Buffer) => (out += b.toString()));
    server.stderr!.on('data', (b: Buffer) => (out += b.toString()));
    const exited = new Promise<number | null>((r) => server.once('exit', (code) => r(code)));
    await new Promise<void>((resolve, reject) => {
      const t = setTimeout(() => reject(new Error(`server did not start: ${out}`)), 30_000);
      server.stdout!.on('data', () => /embedded transfer server/.test(out) && (clearTimeout(t), resolve()));
      void exited.then((code) => (clearTimeout(t), reject(new Error(`server exited (${code}): ${out}`))));
    });
    const port = Number(/listening on https:\/\/127\.0\.0\.1:(\d+)/.exec(out)![1]);
    // A client that began a request and stalls in its body: Fastify's own close would wait for it forever.
    const stalled = request({ host: '127.0.0.1', port, path: '/v1/auth/login', method: 'POST', rejectUnauthorized: false, headers: { 'content-type': 'application/json' } });
    const cut = new Promise<string>((r) => stalled.once('error', (e) => r(e.message)));
    stalled.write('{"username": ');
    await new Promise((r) => setTimeout(r, 300));
    const t0 = Date.now();
    server.kill('SIGTERM');
    assert.equal(await exited, 0, out);
    const took = Date.now() - t0;
    assert.ok(took < 6000, `stopped after ${took} ms`);
    assert.match(await cut, /hang up|ECONNRESET/);
    assert.match(out, /stopping: .*\nstopped\n/);
    // The restart binds the same port.
    const again = createServer();
    await new Promise<void>((resolve, reject) => again.once('error', reject).listen(port, '127.0.0.1', resolve));
    await new Promise((r) => again.close(r));
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});
