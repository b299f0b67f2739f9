// carryon-test: sqlite-only (the laptop's copies of clones are its own; the broker sees a plain check-out, on PostgreSQL in lifecycle.test.ts)
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { checkout, discardLocal, enroll, release, type ClientEnv } from '../../src/client/ops.js';
import { serveDesktop } from '../../src/client/ops/serve.js';
import { Vault } from '../../src/client/vault/vault.js';
import { measureLayer } from '../../src/disk/layer-shape.js';
import { readFillReport } from '../../src/live/disks/disks.js';
import { readFilled } from '../../src/live/fill/fill-direct.js';
import { readDesktop, rewriteDataCluster } from '../support/laptop.js';
import { brokerWithAlice, makeImage, serverDisk as sharedServerDisk, type Api, type TestBroker } from '../broker/harness.js';

process.env.CARRYON_SCRYPT_N = '1024';
let broker: TestBroker;
let http: Api;
let admin: string;
const CHUNK = 256 * 1024;
const logs: string[] = [];
const env = (home: string): ClientEnv => ({ home, user: 'alice', password: async () => 'alice-password', log: (l) => logs.push(l), pollMs: 20 });

let stop: () => Promise<void>;
before(async () => {
  ({ broker, http, admin, close: stop } = await brokerWithAlice());
});
after(() => stop());

const serverDisk = (desktop: string) => sharedServerDisk(broker, desktop);

/** A desktop entitled to alice: 16 MiB, every other chunk random (32 data chunks), or a clone of one. */
async function desktop(name: string, cloneOf?: string): Promise<void> {
  const body = cloneOf ? { name, cloneOf } : { name, image: makeImage(broker.dir, 16, `${name}.raw`), config: { vcpus: 1, ramMiB: 512, minRamMiB: 256 } };
  const r = await http.call('POST', '/v1/admin/desktops', body, admin);
  assert.equal(r.status, 201, JSON.stringify(r.body));
  await http.call('POST', '/v1/admin/entitlements', { principalType: 'user', principal: 'alice', targetType: 'desktop', target: name }, admin);
}

/** A check-out of `name` on `home` in a process of its own, killed (-9) two chunks into its transfer (fill-direct.ts's test hook). */
function checkoutKilled(home: string, name: string): Promise<void> {
  const child = new URL('../support/checkout-child.js', import.meta.url).pathname;
  return new Promise((resolve, reject) => {
    const p = spawn(process.execPath, [child, home, 'alice', 'alice-password', name], { env: { ...process.env, CARRYON_TEST_SIGKILL_AFTER_CHUNKS: '2' }, stdio: ['ignore', 'ignore', 'pipe'] });
    let stderr = '';
    p.stderr.setEncoding('utf8').on('data', (d: string) => (stderr += d));
    p.once('error', reject);
    p.once('close', (code, signal) => (signal === 'SIGKILL' ? resolve() : reject(new Error(`check-out of ${name} ended with ${code ?? signal}, not SIGKILL\n${stderr}`))));
  });
}

test('`serve` continuing an interrupted check-out reads the chunks a clone on this laptop holds instead of fetching them, says so, writes nothing to the clone; a damaged local chunk is fetched', async () => {
  await desktop('seed');
  for (const name of ['seed-2', 'seed-3']) await desktop(name, 'seed');
  const h = join(broker.dir, 'laptop');
  await enroll(env(h), broker.url, { fingerprint: broker.fingerprint, name: 'laptop' });
  // Both killed while the laptop held nothing else of this lineage; then the laptop checks the original out.
  const diskOf = async (name: string) => join(h, 'desktops', (await (await Vault.open(h)).find(name)).desktopId, 'disks', 'disk0');
  for (const name of ['seed-2', 'seed-3']) {
    await checkoutKilled(h, name);
    assert.ok((await readFilled(await diskOf(name))).size < 8, `${name}: most chunks still to come`);
  }
  await checkout(env(h), 'seed');
  const seedBase = join(await diskOf('seed'), 'base.qcow2');

  /** `serve` takes the check-out over and finishes it: bytes on the wire meanwhile, and the last count it published. */
  const served = async (name: string) => {
    logs.length = 0;
    const before = broker.transfer!.stats.bytesOut;
    const s = await serveDesktop(env(h), name);
    try {
      while ((await (await Vault.open(h)).find(name)).state === 'transferring') await new Promise((r) => setTimeout(r, 50));
    } finally {
      await s.close();
    }
    const vault = await Vault.open(h);
    const fill = await readFillReport(vault, (await vault.find(name)).desktopId);
    return { bytes: broker.transfer!.stats.bytesOut - before, copied: fill?.copiedChunks, fetched: fill?.fetchedChunks, done: fill && fill.done === fill.total };
  };
  const whole = await served('seed-2');
  assert.equal(whole.bytes, 0, `nothing on the wire\n${logs.join('\n')}`);
  assert.ok(logs.some((l) => /chunks this laptop holds in seed \(checked out\) \(same lineage\) are read here instead of fetched/.test(l)), logs.join('\n'));
  // Counted as done work, and said apart: copied here, none fetched.
  assert.ok(whole.done && whole.copied! >= 24 && whole.fetched === 0, `100% with ${whole.copied} copied, ${whole.fetched} fetched`);
  assert.ok((await readDesktop(env(h), 'seed-2')).equals(await serverDisk('seed-2')), 'byte-identical to the server');

  // A local copy whose bytes changed on disk (one data cluster of the original's base): that chunk travels, the rest is read here.
  await release(env(h), 'seed-2', 'rollback');
  await discardLocal(env(h), 'seed-2');
  await rewriteDataCluster(seedBase);
  const seedShape = await measureLayer(seedBase, { withoutLuks: true });
  const damaged = await served('seed-3');
  assert.ok(damaged.bytes > CHUNK && damaged.bytes < 2 * (CHUNK + 4096), `one chunk on the wire (${damaged.bytes} bytes)\n${logs.join('\n')}`);
  assert.ok(logs.some((l) => /seed \(checked out\), index \d+: its bytes do not match the chunk ID/.test(l)), logs.join('\n'));
  assert.ok(damaged.fetched! >= 1 && damaged.copied! >= 23, `${damaged.copied} copied, ${damaged.fetched} fetched`);
  assert.ok((await readDesktop(env(h), 'seed-3')).equals(await serverDisk('seed-3')), 'byte-identical to the server');
  assert.equal((await measureLayer(seedBase, { withoutLuks: true })).sha256, seedShape.sha256, 'the damage is still there: nothing was written to the original');
});
