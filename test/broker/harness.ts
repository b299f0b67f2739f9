import { randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { request } from 'undici';
import { startBroker, type BrokerConfig, type RunningBroker } from '../../src/broker/start.js';
import { pinnedAgent } from '../../src/net/pinned-agent.js';
import type { SqlDb } from '../../src/store/sql/driver.js';
import { PgSql } from '../../src/store/sql/pg-driver.js';
import { SqliteSql } from '../../src/store/sql/sqlite-driver.js';
import { testDatabase } from '../support/postgres.js';

export const ADMIN = { name: 'root', password: 'root-password-1' };

export type TestBroker = RunningBroker & { dir: string; database?: string };

const databases = new Map<string, string>();

/**
 * A broker on 127.0.0.1 in a temp dir, with a cheap password hash for speed. Its metadata is in
 * SQLite, or in a fresh PostgreSQL database when the run says so (CARRYON_TEST_DATABASE=postgres).
 */
export async function testBroker(dir = mkdtempSync(join(tmpdir(), 'carryon-broker-')), extra: Partial<BrokerConfig> = {}): Promise<TestBroker> {
  // A broker restarted on the same directory finds its database again.
  const database = 'database' in extra ? extra.database : (databases.get(dir) ?? (await testDatabase()));
  if (database) databases.set(dir, database);
  // Test images are made in the broker's own temp dir: that is the one import directory.
  const b = await startBroker({ dataDir: dir, initAdmin: ADMIN, settings: { passwordCostN: 1024 }, importDirs: [dir], ...extra, database });
  // Whatever a test did, the audit trail must still verify as a chain when its broker stops.
  const close = b.close;
  const checkedClose = async () => {
    const chain = await b.ctx.meta.verifyAuditChain();
    await close();
    if (!chain.ok) throw new Error(`audit chain broken at event ${chain.brokenAt}: ${chain.reason}`);
  };
  return Object.assign(b, { dir, database, close: checkedClose });
}

/** A second connection to a test broker's database, for tests that play someone editing it behind the broker's back. */
export async function openRaw(b: TestBroker): Promise<SqlDb> {
  return b.database ? PgSql.open(b.database, { max: 1 }) : SqliteSql.open(join(b.dir, 'metadata.db'));
}

export function cleanup(dir: string): void {
  rmSync(dir, { recursive: true, force: true });
}

export interface Api {
  call(method: string, path: string, body?: unknown, token?: string): Promise<{ status: number; body: Record<string, unknown> }>;
  login(username: string, password: string, deviceId?: string): Promise<string>;
  close(): Promise<void>;
}

export function api(url: string, fingerprint: string): Api {
  const agent = pinnedAgent(fingerprint);
  const call: Api['call'] = async (method, path, body, token) => {
    const res = await request(`${url}${path}`, {
      method: method as 'GET',
      dispatcher: agent,
      headers: { ...(body !== undefined ? { 'content-type': 'application/json' } : {}), ...(token ? { authorization: `Bearer ${token}` } : {}) },
      body: body === undefined ? undefined : typeof body === 'string' ? body : JSON.stringify(body),
    });
    const text = await res.body.text();
    return { status: res.statusCode, body: text ? (JSON.parse(text) as Record<string, unknown>) : {} };
  };
  return {
    call,
    async login(username, password, deviceId) {
      const r = await call('POST', '/v1/auth/login', { username, password, deviceId });
      if (r.status !== 200) throw new Error(`login failed: ${JSON.stringify(r.body)}`);
      return String(r.body.token);
    },
    close: () => agent.close(),
  };
}

/** A small raw image: random data with holes, `mib` MiB. */
export function makeImage(dir: string, mib: number, name = 'disk.raw'): string {
  const path = join(dir, name);
  const data = Buffer.alloc(mib * 1024 * 1024);
  for (let off = 0; off < data.length; off += 512 * 1024) randomBytes(256 * 1024).copy(data, off);
  writeFileSync(path, data);
  return path;
}
