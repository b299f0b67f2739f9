import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync, readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { runAgent } from '../../src/client/agent.js';
import { loadDevice } from '../../src/client/home.js';
import { checkout, discardLocal, enroll, exportDisk, release, upload, type ClientEnv } from '../../src/client/ops.js';
import { listParked } from '../../src/client/parked.js';
import { serveDesktop } from '../../src/client/serve.js';
import { CarryonError } from '../../src/core/errors.js';
import type { RunningBroker } from '../../src/broker/start.js';
import { exportCurrentSnapshot } from '../../src/broker/snapshot-image.js';
import { readDesktop, runCarryon, writeDesktop } from '../support/laptop.js';
import { ADMIN, api, cleanup, makeImage, testBroker, type Api } from '../broker/harness.js';

process.env.CARRYON_SCRYPT_N = '1024';
let broker: RunningBroker & { dir: string };
let http: Api;
let admin: string;
const CHUNK = 256 * 1024;
const logs: string[] = [];

function env(home: string): ClientEnv {
  return { home, user: 'alice', password: async () => 'alice-password', log: (l) => logs.push(l), pollMs: 20 };
}

before(async () => {
  broker = await testBroker();
  http = api(broker.url, broker.fingerprint);
  admin = await http.login(ADMIN.name, ADMIN.password);
  await http.call('POST', '/v1/admin/users', { name: 'alice', password: 'alice-password' }, admin);
});
after(async () => {
  await http.close();
  await broker.close();
  cleanup(broker.dir);
});

/** A desktop of `mib` MiB (every other chunk random, makeImage) entitled to alice. */
async function desktop(name: string, mib = 16): Promise<void> {
  const image = makeImage(broker.dir, mib, `${name}.raw`);
  const r = await http.call('POST', '/v1/admin/desktops', { name, image, config: { vcpus: 1, ramMiB: 512, minRamMiB: 256 } }, admin);
  assert.equal(r.status, 201, JSON.stringify(r.body));
  await http.call('POST', '/v1/admin/entitlements', { principalType: 'user', principal: 'alice', targetType: 'desktop', target: name }, admin);
}

async function laptop(name: string): Promise<string> {
  const home = join(broker.dir, name);
  await enroll(env(home), broker.url, { fingerprint: broker.fingerprint, name });
  return home;
}

async function serverDisk(name: string): Promise<Buffer> {
  const out = join(broker.dir, `export-${randomBytes(4).toString('hex')}.raw`);
  await exportCurrentSnapshot(broker.ctx, name, out);
  return readFileSync(out);
}

/** Chunks and bytes the transfer server sent while `fn` ran. */
async function onTheWire<T>(fn: () => Promise<T>): Promise<{ result: T; bytes: number }> {
  const before = broker.transfer!.stats.bytesOut;
  const result = await fn();
  return { result, bytes: broker.transfer!.stats.bytesOut - before };
}

const parkedFiles = (home: string) => (existsSync(join(home, 'parked')) ? readdirSync(join(home, 'parked')).filter((n) => !n.startsWith('.')) : []);

test('check-in parks the desktop; the next check-out on this device moves only the chunks changed on the server since, byte-identical', async () => {
  await desktop('office');
  const a = await laptop('laptop-a');
  const b = await laptop('laptop-b');
  const first = await onTheWire(() => checkout(env(a), 'office'));
  assert.equal(first.result.chunksMoved, 32, 'a 16 MiB desktop, every other chunk random: 32 chunks');
  await writeDesktop(env(a), 'office', [{ offset: 5 * CHUNK + 100, data: randomBytes(5000) }, { offset: 40 * CHUNK, data: randomBytes(CHUNK) }]);
  await upload(env(a), 'office', 'checkin');
  const parked = await listParked(a);
  assert.deepEqual(parked.map((p) => p.name), ['office']);
  assert.ok(parked[0]!.bytes > 0, 'the parked copy is counted');
  assert.equal(readdirSync(join(a, 'desktops')).length, 0, 'no checked-out desktop left');

  // Another device changes three chunks on the server (one whole, two in part).
  await checkout(env(b), 'office');
  await writeDesktop(env(b), 'office', [{ offset: 2 * CHUNK, data: randomBytes(CHUNK) }, { offset: 9 * CHUNK + 4096, data: randomBytes(4096) }, { offset: 60 * CHUNK + 8192, data: randomBytes(100) }]);
  await upload(env(b), 'office', 'checkin');

  logs.length = 0;
  const second = await onTheWire(() => checkout(env(a), 'office'));
  assert.equal(second.result.chunksMoved, 3, `only the 3 chunks changed since the parked check-in travel\n${logs.join('\n')}`);
  assert.ok(second.bytes < 3 * CHUNK + 4096 && second.bytes >= 2 * CHUNK, `${second.bytes} bytes on the wire for 3 chunks`);
  assert.equal(parkedFiles(a).length, 0, 'the parked copy became the check-out');
  assert.ok((await readDesktop(env(a), 'office')).equals(await serverDisk('office')), 'byte-identical to the server');
  await release(env(a), 'office', 'rollback');
});
