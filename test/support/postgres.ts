import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { chownSync, existsSync, mkdtempSync, readdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import pg from 'pg';
import { freePort } from './ports.js';

/**
 * A throwaway PostgreSQL cluster for the tests: `initdb` in a temp dir, `postgres` on 127.0.0.1
 * and a free port (its socket in the temp dir, never /var/run), trust auth on loopback only,
 * fsync off. Runs as the invoking user, or as `postgres` when that is root (initdb refuses root).
 * The server dies with the process that started it (pdeathsig), and `stop()` removes the dir.
 */
export interface PgCluster {
  /** Superuser URL of the maintenance database (`postgres`). */
  url: string;
  stop(): Promise<void>;
  /** For an `exit` handler: kills the server and removes its directory, synchronously. */
  stopNow(): void;
}

function pgBin(): string {
  if (process.env.CARRYON_PG_BIN) return process.env.CARRYON_PG_BIN;
  const base = '/usr/lib/postgresql';
  const versions = existsSync(base) ? readdirSync(base).filter((v) => existsSync(join(base, v, 'bin', 'initdb'))).sort((a, b) => Number(b) - Number(a)) : [];
  if (!versions.length) throw new Error('PostgreSQL server binaries not found (install the Debian package postgresql, or set CARRYON_PG_BIN)');
  return join(base, versions[0]!, 'bin');
}

/** `setpriv` runs the server as `postgres` under root, and ties it to our life either way. */
function asServerUser(cmd: string, args: string[]): [string, string[]] {
  const root = process.getuid?.() === 0;
  return ['setpriv', [...(root ? ['--reuid=postgres', '--regid=postgres', '--init-groups'] : []), '--pdeathsig', 'KILL', cmd, ...args]];
}

export async function startPostgres(): Promise<PgCluster> {
  const bin = pgBin();
  const dir = mkdtempSync(join(tmpdir(), 'carryon-pg-'));
  if (process.getuid?.() === 0) {
    const id = spawnSync('id', ['-u', 'postgres'], { encoding: 'utf8' });
    const gid = spawnSync('id', ['-g', 'postgres'], { encoding: 'utf8' });
    if (id.status !== 0) throw new Error('running as root needs a postgres user to run the test cluster as');
    chownSync(dir, Number(id.stdout.trim()), Number(gid.stdout.trim()));
  }
  const data = join(dir, 'data');
  const [icmd, iargs] = asServerUser(join(bin, 'initdb'), ['-D', data, '-U', 'postgres', '--auth=trust', '-E', 'UTF8', '--no-sync', '--no-instructions']);
  const init = spawnSync(icmd, iargs, { encoding: 'utf8' });
  if (init.status !== 0) {
    rmSync(dir, { recursive: true, force: true });
    throw new Error(`initdb failed: ${init.stderr || init.stdout}`);
  }
  const port = await freePort();
  const [cmd, args] = asServerUser(join(bin, 'postgres'), [
    '-D', data, '-k', dir, '-h', '127.0.0.1', '-p', String(port),
    '-c', 'fsync=off', '-c', 'synchronous_commit=off', '-c', 'full_page_writes=off', '-c', 'max_connections=300', '-c', 'shared_buffers=64MB',
  ]);
  let log = '';
  const p: ChildProcess = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'] });
  p.stdout?.on('data', (d: Buffer) => (log = (log + d.toString()).slice(-4000)));
  p.stderr?.on('data', (d: Buffer) => (log = (log + d.toString()).slice(-4000)));
  const url = `postgres://postgres@127.0.0.1:${port}/postgres`;
  const stop = async () => {
    if (p.exitCode === null && p.signalCode === null) {
      const exited = new Promise<void>((r) => p.once('exit', () => r()));
      p.ref(); // unref'd while running: waiting for its exit must keep us alive
      p.kill('SIGQUIT'); // immediate shutdown: nothing here is worth a checkpoint
      await exited;
    }
    rmSync(dir, { recursive: true, force: true });
  };
  const deadline = Date.now() + 30_000;
  for (;;) {
    if (p.exitCode !== null) {
      await stop();
      throw new Error(`postgres exited (${p.exitCode}):\n${log}`);
    }
    const c = new pg.Client({ connectionString: url });
    try {
      await c.connect();
      await c.end();
      break;
    } catch {
      await c.end().catch(() => undefined);
      if (Date.now() > deadline) {
        await stop();
        throw new Error(`postgres did not accept connections in time:\n${log}`);
      }
      await new Promise((r) => setTimeout(r, 100));
    }
  }
  // The server never keeps this process alive (a test file ends when its tests do).
  p.unref();
  for (const s of [p.stdout, p.stderr]) (s as { unref?: () => void } | null)?.unref?.();
  const stopNow = () => {
    p.kill('SIGKILL');
    rmSync(dir, { recursive: true, force: true });
  };
  return { url, stop, stopNow };
}

/** A new empty database on the cluster; its URL. */
export async function freshDatabase(clusterUrl: string): Promise<string> {
  const name = `carryon_${randomBytes(6).toString('hex')}`;
  const c = new pg.Client({ connectionString: clusterUrl });
  await c.connect();
  try {
    await c.query(`CREATE DATABASE ${name}`);
  } finally {
    await c.end();
  }
  const u = new URL(clusterUrl);
  u.pathname = `/${name}`;
  return u.toString();
}

let own: Promise<PgCluster> | null = null;

/**
 * The cluster for this test process: the one `scripts/run-tests.mjs` started (CARRYON_TEST_PG_URL),
 * or one of its own, started on first use and stopped when the process exits.
 */
export async function testCluster(): Promise<string> {
  if (process.env.CARRYON_TEST_PG_URL) return process.env.CARRYON_TEST_PG_URL;
  own ??= startPostgres().then((c) => {
    process.once('exit', () => c.stopNow());
    return c;
  });
  return (await own).url;
}

/** True when this run puts brokers on PostgreSQL (`CARRYON_TEST_DATABASE=postgres`). */
export function testOnPostgres(): boolean {
  return process.env.CARRYON_TEST_DATABASE === 'postgres';
}

/** For a broker the tests start: a fresh PostgreSQL database in a postgres run, else undefined (SQLite). */
export async function testDatabase(): Promise<string | undefined> {
  return testOnPostgres() ? freshDatabase(await testCluster()) : undefined;
}
