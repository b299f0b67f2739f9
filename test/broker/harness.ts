import { makeCredential } from '../../src/broker/hosts/credentials.js';
import { randomBytes } from 'node:crypto';
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { request } from 'undici';
import { exportCurrentSnapshot } from '../../src/broker/desktops/snapshot-image.js';
import { startBroker, type BrokerConfig, type RunningBroker } from '../../src/broker/start.js';
import { pinnedAgent } from '../../src/net/pinned-agent.js';
import type { SqlDb } from '../../src/sql/driver.js';
import { PgSql } from '../../src/sql/pg-driver.js';
import { SqliteSql } from '../../src/sql/sqlite-driver.js';
import { defaultS3IndexPath } from '../../src/store/s3-chunk-store.js';
import { isS3Url } from '../../src/store/s3-config.js';
import { testDatabase } from '../support/postgres.js';
import { testChunkStore } from '../support/swift.js';

export const ADMIN = { name: 'root', password: 'root-password-1' };

/** `chunkStore`: where its chunks are, a directory or an `s3://` URL (its pack index in `database`, else in `dir`). */
export type TestBroker = RunningBroker & { dir: string; database?: string; chunkStore: string };

const databases = new Map<string, string>();
const chunkStores = new Map<string, string>();

/**
 * A broker on 127.0.0.1 in a temp dir, with a cheap password hash for speed. Its metadata is in
 * SQLite, or in a fresh PostgreSQL database when the run says so (CARRYON_TEST_DATABASE=postgres);
 * its chunks in a pack store in the dir, or in a fresh S3 bucket when the run says so
 * (CARRYON_TEST_STORE=s3). A test that needs local pack files passes `chunkStore: join(dir, 'chunks')`.
 */
export async function testBroker(dir = mkdtempSync(join(tmpdir(), 'carryon-broker-')), extra: Partial<BrokerConfig> = {}): Promise<TestBroker> {
  // A broker restarted on the same directory finds its database and its chunks again.
  const database = 'database' in extra ? extra.database : (databases.get(dir) ?? (await testDatabase()));
  if (database) databases.set(dir, database);
  const chunkStore = extra.chunkStore ?? chunkStores.get(dir) ?? (await testChunkStore()) ?? join(dir, 'chunks');
  chunkStores.set(dir, chunkStore);
  // Test images are made in the broker's own temp dir: that is the one import directory.
  const b = await startBroker({ dataDir: dir, initAdmin: ADMIN, settings: { passwordCostN: 1024 }, importDirs: [dir], ...extra, database, chunkStore });
  // Whatever a test did, the audit trail must still verify as a chain when its broker stops.
  const close = b.close;
  const checkedClose = async () => {
    const chain = await b.ctx.meta.verifyAuditChain();
    await close();
    if (!chain.ok) throw new Error(`audit chain broken at event ${chain.brokenAt}: ${chain.reason}`);
    // On S3, nothing (the broker, a transfer server beside it) may have opened a pack store in its directory.
    if (isS3Url(chunkStore) && existsSync(join(dir, 'chunks'))) throw new Error(`broker on ${chunkStore.split('?')[0]} has local chunks in ${dir}`);
  };
  return Object.assign(b, { dir, database, chunkStore, close: checkedClose });
}

/**
 * What a standalone transfer server beside `b` opens as its store (`--store`): the same directory,
 * or the same bucket plus the pack index the broker uses (its PostgreSQL database, else its SQLite file).
 */
export function transferStore(b: TestBroker): string {
  if (!isS3Url(b.chunkStore)) return b.chunkStore;
  return `${b.chunkStore}${b.chunkStore.includes('?') ? '&' : '?'}index=${encodeURIComponent(b.database ?? defaultS3IndexPath(b.dir))}`;
}

/** A second connection to a test broker's database, for tests that play someone editing it behind the broker's back. */
export async function openRaw(b: TestBroker): Promise<SqlDb> {
  return b.database ? PgSql.open(b.database, { max: 1 }) : SqliteSql.open(join(b.dir, 'metadata.db'));
}

const hostCredentials = new WeakMap<TestBroker, Map<string, string>>();
/** A desktop host's own credential, as `carryon admin hosts add ID` makes it (once per id and broker). */
export async function hostCredential(b: TestBroker, id: string): Promise<string> {
  const made = hostCredentials.get(b) ?? new Map<string, string>();
  hostCredentials.set(b, made);
  if (!made.has(id)) {
    const c = makeCredential(id);
    if (!(await b.ctx.hosts.addKey(id, c.hash, 'test'))) throw new Error(`host ${id} has a credential already`);
    made.set(id, c.credential);
  }
  return made.get(id)!;
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

/** A broker with its admin logged in and the user `alice` (password `alice-password`): the laptop tests' common start. */
export async function brokerWithAlice(): Promise<{ broker: TestBroker; http: Api; admin: string; close(): Promise<void> }> {
  const broker = await testBroker();
  const http = api(broker.url, broker.fingerprint);
  const admin = await http.login(ADMIN.name, ADMIN.password);
  await http.call('POST', '/v1/admin/users', { name: 'alice', password: 'alice-password' }, admin);
  return {
    broker, http, admin,
    async close() {
      await http.close();
      await broker.close();
      cleanup(broker.dir);
    },
  };
}

/** The desktop's current snapshot on the broker, assembled as a raw disk (what a laptop's disk must equal). */
export async function serverDisk(broker: RunningBroker & { dir: string }, desktop: string): Promise<Buffer> {
  const out = join(broker.dir, `export-${randomBytes(4).toString('hex')}.raw`);
  await exportCurrentSnapshot(broker.ctx, desktop, out);
  return readFileSync(out);
}
