import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { checkout, enroll, release, status, upload, type ClientEnv } from '../../src/client/ops.js';
import { chainFiles } from '../../src/disk/chain.js';
import { checkChain } from '../../src/disk/chain.js';
import { chainOf, diskDir } from '../../src/live/disks/disks.js';
import { loadDevice } from '../../src/client/vault/home.js';
import { Vault, type DesktopState } from '../../src/client/vault/vault.js';
import { exportSnapshot, exportCurrentSnapshot } from '../../src/broker/desktops/snapshot-image.js';
import { NbdClient } from '../../src/nbd/client.js';
import { runAgent } from '../../src/client/agent.js';
import { connect, createServer } from 'node:net';
import { runCarryon } from '../support/laptop.js';
import { brokerWithAlice, makeImage, type Api, type TestBroker } from '../broker/harness.js';

// Live replicas (src/live/): the desktop is held by `serve` in a process of its own, as `run`
// holds it; this process takes replicas and check-ins of it while writes go on.
process.env.CARRYON_SCRYPT_N = '1024';
let broker: TestBroker;
let http: Api;
let admin: string;
const MIB = 1024 * 1024;
const logs: string[] = [];
const serveChild = new URL('../support/serve-child.js', import.meta.url).pathname;

function env(home: string): ClientEnv {
  return { home, user: 'alice', password: async () => 'alice-password', log: (l) => logs.push(l), pollMs: 20 };
}

let stop: () => Promise<void>;
before(async () => {
  ({ broker, http, admin, close: stop } = await brokerWithAlice());
});
after(() => stop());

async function newDesktop(name: string, mib: number): Promise<{ image: Buffer; home: string }> {
  const path = makeImage(broker.dir, mib, `${name}.raw`);
  const r = await http.call('POST', '/v1/admin/desktops', { name, image: path, config: { vcpus: 1, ramMiB: 512, minRamMiB: 256 } }, admin);
  assert.equal(r.status, 201, JSON.stringify(r.body));
  await http.call('POST', '/v1/admin/entitlements', { principalType: 'user', principal: 'alice', targetType: 'desktop', target: name }, admin);
  const home = join(broker.dir, `laptop-${name}`);
  await enroll(env(home), broker.url, { fingerprint: broker.fingerprint, name: `laptop-${name}` });
  await checkout(env(home), name);
  return { image: readFileSync(path), home };
}

/** `serve` in its own process: the holder of the chain. */
async function startServe(home: string, name: string, extraEnv: Record<string, string> = {}): Promise<{ child: ChildProcess; socket: string; ended: Promise<{ code: number | null; signal: NodeJS.Signals | null }>; stderr: () => string }> {
  const child = spawn(process.execPath, [serveChild, home, 'alice', 'alice-password', name], { env: { ...process.env, ...extraEnv }, stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  let err = '';
  child.stderr!.setEncoding('utf8').on('data', (d: string) => (err += d));
  const ended = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((r) => child.once('close', (code, signal) => r({ code, signal })));
  const socket = await new Promise<string>((resolve, reject) => {
    child.stdout!.setEncoding('utf8').on('data', (d: string) => {
      out += d;
      const line = out.split('\n').find((l) => l.endsWith('.sock'));
      if (line) resolve(line);
    });
    void ended.then(({ code }) => reject(new Error(`serve ended (${code}) before its socket was up:\n${err}`)));
  });
  return { child, socket, ended, stderr: () => err };
}

async function stopServe(s: { child: ChildProcess; ended: Promise<unknown> }): Promise<void> {
  s.child.kill('SIGTERM');
  await s.ended;
}

async function readAll(c: NbdClient): Promise<Buffer> {
  const parts: Buffer[] = [];
  for (let off = 0; off < c.size; off += 8 * MIB) parts.push(await c.read(off, Math.min(8 * MIB, c.size - off)));
  return Buffer.concat(parts);
}

async function snapshotDisk(desktop: string, snapshotId: string): Promise<Buffer> {
  const out = join(broker.dir, `snap-${randomBytes(4).toString('hex')}.raw`);
  await exportSnapshot(broker.ctx, desktop, snapshotId, out);
  return readFileSync(out);
}

async function currentDisk(desktop: string): Promise<Buffer> {
  const out = join(broker.dir, `cur-${randomBytes(4).toString('hex')}.raw`);
  await exportCurrentSnapshot(broker.ctx, desktop, out);
  return readFileSync(out);
}

async function vaultState(home: string, name: string): Promise<{ vault: Vault; state: DesktopState; keys: Awaited<ReturnType<Vault['openKeys']>>['keys'] }> {
  const vault = await Vault.open(home);
  const { state, keys } = await vault.openKeys(await loadDevice(home), 'alice-password', await vault.find(name));
  return { vault, state, keys };
}

/** Changes a desktop's vault state as the vault writes it (MACed). */
async function vaultUpdate(home: string, name: string, change: (s: DesktopState) => DesktopState): Promise<void> {
  const { vault, state, keys } = await vaultState(home, name);
  await vault.save(change(state), keys);
}

/** A model of the disk and the writes made to it, in order. */
class Model {
  readonly writes: { offset: number; data: Buffer }[] = [];
  constructor(readonly base: Buffer) {}
  at(n: number): Buffer {
    const b = Buffer.from(this.base);
    for (const w of this.writes.slice(0, n)) w.data.copy(b, w.offset);
    return b;
  }
  /** Which prefix of the writes (at least `from`) `disk` holds, or -1. */
  prefixOf(disk: Buffer, from = 0): number {
    const b = this.at(from);
    for (let n = from; ; n++) {
      if (b.equals(disk)) return n;
      const w = this.writes[n];
      if (!w) return -1;
      w.data.copy(b, w.offset);
    }
  }
}

test('live replicas of a desktop held by another process: the guest writes on, each restore point is one point in time, the base follows', async () => {
  const { image, home } = await newDesktop('live', 16);
  const model = new Model(image);
  // The background check of the base is slow here (2 MiB/s), so the first point is frozen while it runs.
  const serve = await startServe(home, 'live', { CARRYON_VERIFY_RATE: String(2 * MIB) });
  const disk = await NbdClient.connect(serve.socket, 'disk0');
  try {
    const write = async (offset: number, data: Buffer) => {
      await disk.write(offset, data);
      model.writes.push({ offset, data });
    };
    await write(3 * MIB + 4096, randomBytes(256 * 1024));
    await write(9 * MIB, randomBytes(4096));
    await disk.flush();

    // First replica: the two writes, nothing else.
    logs.length = 0;
    const first = await upload(env(home), 'live', 'replicate');
    assert.equal(first.replicaKind, 'crash-consistent');
    assert.ok(logs.some((l) => /while it runs: point in time taken.*paused [\d.]+ ms/.test(l)), logs.join('\n'));
    assert.ok((await snapshotDisk('live', first.snapshotId)).equals(model.at(2)), 'the restore point holds the writes before it');
    let { state } = await vaultState(home, 'live');
    const d0 = state.disks[0]!;
    assert.deepEqual([d0.top, d0.under, d0.mergingTo, state.lastReplicaKind], ['top-b.qcow2', null, null, 'crash-consistent']);
    assert.equal(existsSync(join(diskDir(await Vault.open(home), state.desktopId, 'disk0'), 'top.qcow2')), false, 'the frozen layer is gone once folded');

    // Second replica while a writer keeps writing: one point in time, and no write lost.
    let writing = true;
    const writer = (async () => {
      // Paced (a guest's small writes), so the restore point's place among them is found quickly.
      for (let i = 0; writing && i < 1000; i++) {
        await write(Math.floor(Math.random() * (16 * MIB - 8192) / 4096) * 4096, randomBytes(4096));
        await new Promise((r) => setTimeout(r, 3));
      }
    })();
    await new Promise((r) => setTimeout(r, 50));
    const before = model.writes.length;
    const second = await upload(env(home), 'live', 'replicate');
    writing = false;
    await writer;
    const atPoint = model.prefixOf(await snapshotDisk('live', second.snapshotId), before);
    assert.ok(atPoint >= before, `the second restore point is the disk after exactly the first ${atPoint} writes (at least ${before})`);
    assert.ok((await readAll(disk)).equals(model.at(model.writes.length)), 'every write the guest made is on its disk');
    ({ state } = await vaultState(home, 'live'));
    assert.deepEqual([state.disks[0]!.top, state.disks[0]!.under], ['top.qcow2', null]);

    // A small change sends only its pages (the fold left the top holding what came after the point).
    await write(12 * MIB, randomBytes(4096));
    const third = await upload(env(home), 'live', 'replicate');
    assert.ok(third.bytesSent < 64 * 1024 + (model.writes.length - atPoint) * 5000, `${third.bytesSent} bytes sent for the writes since the last replica`);
    assert.ok((await snapshotDisk('live', third.snapshotId)).equals(model.at(model.writes.length)));
    // The replicas read the frozen pages in their own storage daemon, not through the holder.
    assert.deepEqual(logs.filter((l) => l.includes('through the holder')), []);
  } finally {
    await disk.close();
    await stopServe(serve);
  }
  // Closed cleanly: the chain is base + top, and checks clean; the base's background check found nothing (the fold writes it).
  const { vault, state, keys } = await vaultState(home, 'live');
  await checkChain(chainOf(vault, state, keys, 'disk0'));
  const [st] = await status(env(home), 'live');
  assert.deepEqual([st!.problem, st!.safeOffline, state.damaged], [null, true, null]);
  await release(env(home), 'live', 'rollback');
});

test('a replica that fails before the broker acknowledges it, or whose sender is killed, goes back into the top: nothing lost, the next one completes', async () => {
  const { image, home } = await newDesktop('live-abandon', 8);
  const model = new Model(image);
  const serve = await startServe(home, 'live-abandon');
  const disk = await NbdClient.connect(serve.socket, 'disk0');
  try {
    const data = randomBytes(512 * 1024);
    await disk.write(MIB, data);
    model.writes.push({ offset: MIB, data });
    // Refused by the broker (aborted before it is sent): the point is abandoned.
    const abort = new AbortController();
    abort.abort();
    await assert.rejects(upload({ ...env(home), signal: abort.signal }, 'live-abandon', 'replicate'));
    let { state } = await vaultState(home, 'live-abandon');
    assert.deepEqual([state.disks[0]!.top, state.disks[0]!.under, state.lastReplicationAt], ['top.qcow2', null, null]);
    const later = randomBytes(4096);
    await disk.write(5 * MIB, later);
    model.writes.push({ offset: 5 * MIB, data: later });
    assert.ok((await readAll(disk)).equals(model.at(2)), 'the writes before and after the abandoned point are all there');

    // The sender killed with -9 mid-replica (a slow link: 32 KiB/s): the holder sees its control connection close.
    const more = randomBytes(256 * 1024);
    await disk.write(6 * MIB, more);
    model.writes.push({ offset: 6 * MIB, data: more });
    const sender = spawn(process.execPath, [join(process.cwd(), 'dist', 'src', 'cli', 'main.js'), 'replicate', 'live-abandon', '--limit-rate', '32k'], {
      env: { ...process.env, CARRYON_HOME: home, CARRYON_USER: 'alice', CARRYON_PASSWORD: 'alice-password' }, stdio: ['ignore', 'ignore', 'pipe'],
    });
    let said = '';
    await new Promise<void>((resolve, reject) => {
      sender.stderr!.setEncoding('utf8').on('data', (d: string) => {
        said += d;
        if (/point in time taken/.test(said)) resolve();
      });
      sender.once('exit', () => reject(new Error(`the sender ended before its point in time:\n${said}`)));
    });
    const killed = new Promise((r) => sender.once('exit', r));
    sender.kill('SIGKILL');
    await killed;
    for (let i = 0; i < 100 && ((await vaultState(home, 'live-abandon')).state.disks[0]!.under !== null); i++) await new Promise((r) => setTimeout(r, 100));
    ({ state } = await vaultState(home, 'live-abandon'));
    assert.deepEqual([state.disks[0]!.top, state.disks[0]!.under], ['top.qcow2', null], 'the killed sender\'s point went back into the top');
    assert.ok((await readAll(disk)).equals(model.at(3)));

    // The agent's background replica in flight (slow link) when the user asks for one: it gives way
    // (stops, puts its point back), and the user's replica is taken at once and holds every write.
    const background = spawn(process.execPath, [join(process.cwd(), 'dist', 'src', 'cli', 'main.js'), 'replicate', 'live-abandon', '--background', '--limit-rate', '32k'], {
      env: { ...process.env, CARRYON_HOME: home, CARRYON_USER: 'alice', CARRYON_PASSWORD: 'alice-password' }, stdio: ['ignore', 'ignore', 'pipe'],
    });
    let bgSaid = '';
    const bgExit = new Promise<number | null>((r) => background.once('exit', r));
    await new Promise<void>((resolve, reject) => {
      background.stderr!.setEncoding('utf8').on('data', (d: string) => {
        bgSaid += d;
        if (/point in time taken/.test(bgSaid)) resolve();
      });
      void bgExit.then(() => reject(new Error(`the background replica ended before its point in time:\n${bgSaid}`)));
    });
    const t0 = performance.now();
    const done = await upload(env(home), 'live-abandon', 'replicate');
    assert.ok(performance.now() - t0 < 30_000, 'the user did not wait for the background replica to end');
    assert.notEqual(await bgExit, 0);
    assert.match(bgSaid, /gave way to a check-in or replica asked for meanwhile: nothing is lost/);
    assert.ok((await snapshotDisk('live-abandon', done.snapshotId)).equals(model.at(3)));
    ({ state } = await vaultState(home, 'live-abandon'));
    assert.equal(state.disks[0]!.under, null);
  } finally {
    await disk.close();
    await stopServe(serve);
  }
  await release(env(home), 'live-abandon', 'rollback');
});

// The holder's kill points touch the laptop's chain, not the broker's database: the SQLite pass runs them.
const onPostgres = process.env.CARRYON_TEST_DATABASE === 'postgres';

test('kill -9 of the holder at 20 points of a live replica, and of its QEMU alone at 3: the chain reopens with every write, checks clean, and the next replica completes', { skip: onPostgres && 'laptop-side only (run in the SQLite pass)' }, async (t) => {
  const { image, home } = await newDesktop('live-kill', 8);
  const model = new Model(image);
  const steps = ['point-begun', 'point-taken', 'acknowledged', 'folding', 'folded'];
  // Each step twice, then ten points part-way into the fold's block-commit, 0–25 ms after it starts.
  // And three where QEMU (the storage daemon) dies alone: the holder must notice, stop, and settle the chain itself.
  const points = process.env.LIVE_POINTS ? process.env.LIVE_POINTS.split(' ') : [...steps, ...steps, ...Array.from({ length: 10 }, () => `folding:${Math.floor(Math.random() * 26)}`), 'point-taken:qemu', 'acknowledged:qemu', 'folded:qemu'];
  t.diagnostic(`kill points: ${points.join(' ')}`);
  for (const point of points) {
    const [step, after] = point.split(':') as [string, string | undefined];
    const qemuOnly = after === 'qemu';
    const delay = qemuOnly ? undefined : after;
    const opened = (e: unknown) => { throw new Error(`at ${point} (${points.indexOf(point)}): ${(e as Error).message}`); };
    const serve = await startServe(home, 'live-kill', { CARRYON_TEST_SIGKILL_AT: qemuOnly ? point : step, ...(delay ? { CARRYON_TEST_SIGKILL_DELAY_MS: delay } : {}) }).catch(opened);
    const disk = await NbdClient.connect(serve.socket, 'disk0');
    const data = randomBytes(64 * 1024 * (1 + Math.floor(Math.random() * 8)));
    const offset = Math.floor(Math.random() * ((8 * MIB - data.length) / (64 * 1024) + 1)) * 64 * 1024;
    await disk.write(offset, data);
    await disk.flush();
    model.writes.push({ offset, data });
    await upload(env(home), 'live-kill', 'replicate').catch(() => undefined);
    const ended = await serve.ended;
    await disk.close().catch(() => undefined);
    if (qemuOnly) assert.deepEqual([ended.code, /ended unexpectedly/.test(serve.stderr())], [0, true], `QEMU killed at ${step}: the holder stops by itself\n${serve.stderr()}`);
    else assert.equal(ended.signal, 'SIGKILL', `killed at ${point}:\n${serve.stderr()}`);
    // Reopened: settled to base + top, every write there.
    const again = await startServe(home, 'live-kill').catch(opened);
    const reader = await NbdClient.connect(again.socket, 'disk0');
    try {
      assert.ok((await readAll(reader)).equals(model.at(model.writes.length)), `after a kill at ${point}, the disk holds every write`);
    } finally {
      await reader.close();
      await stopServe(again);
    }
    const { vault, state, keys } = await vaultState(home, 'live-kill');
    assert.deepEqual([state.disks[0]!.under, state.disks[0]!.mergingTo], [null, null], `settled after a kill at ${point}`);
    await checkChain(chainOf(vault, state, keys, 'disk0'));
    const dir = diskDir(vault, state.desktopId, 'disk0');
    assert.ok(existsSync(chainFiles(dir, state.disks[0]!.top).top));
  }
  // The next replica (the desktop stopped) completes and holds everything.
  const last = await upload(env(home), 'live-kill', 'replicate');
  assert.ok((await snapshotDisk('live-kill', last.snapshotId)).equals(model.at(model.writes.length)));
  await release(env(home), 'live-kill', 'rollback');
});

test('check-in of a running desktop: the bulk goes while it runs, the holder stops, only the rest follows; the snapshot holds every write', async () => {
  const { image, home } = await newDesktop('live-checkin', 16);
  const model = new Model(image);
  const serve = await startServe(home, 'live-checkin');
  const disk = await NbdClient.connect(serve.socket, 'disk0');
  const bulk = randomBytes(4 * MIB);
  await disk.write(2 * MIB, bulk);
  model.writes.push({ offset: 2 * MIB, data: bulk });
  await disk.flush();
  await disk.close();
  logs.length = 0;
  const res = await upload(env(home), 'live-checkin', 'checkin');
  const ended = await serve.ended;
  assert.equal(ended.code, 0, serve.stderr());
  assert.ok(typeof res.offToCommitSeconds === 'number', 'the wait after the power-off is measured');
  assert.ok(logs.some((l) => /sent ahead as restore point/.test(l)), logs.join('\n'));
  assert.ok(res.bytesSent < MIB, `after the live bulk, the check-in itself sent ${res.bytesSent} bytes`);
  assert.ok((await currentDisk('live-checkin')).equals(model.at(1)), 'the checked-in snapshot holds the write');
  assert.deepEqual(await status(env(home), 'live-checkin').catch(() => []), []);
});

/** A TCP relay to the broker that can be cut and restored on the same port (the broker "down for a while"). */
async function relay(target: URL): Promise<{ url: string; down(): Promise<void>; up(): Promise<void>; close(): Promise<void> }> {
  const sockets = new Set<import('node:net').Socket>();
  let server: import('node:net').Server | null = null;
  let port = 0;
  const listen = async () => {
    server = createServer((inbound) => {
      const outbound = connect(Number(target.port), target.hostname);
      for (const s of [inbound, outbound]) {
        sockets.add(s);
        s.on('error', () => undefined);
        s.on('close', () => sockets.delete(s));
      }
      inbound.pipe(outbound).pipe(inbound);
    });
    await new Promise<void>((r) => server!.listen(port, '127.0.0.1', () => r()));
    port = (server!.address() as import('node:net').AddressInfo).port;
  };
  const down = async () => {
    for (const s of sockets) s.destroy();
    await new Promise<void>((r) => (server ? server.close(() => r()) : r()));
    server = null;
  };
  await listen();
  return { url: `https://127.0.0.1:${port}`, down, up: listen, close: down };
}

test('background replication: the agent replicates a running desktop on the policy\'s schedule, waits while the broker is away, and goes on when it is back', async () => {
  const path = makeImage(broker.dir, 8, 'live-agent.raw');
  assert.equal((await http.call('POST', '/v1/admin/desktops', { name: 'live-agent', image: path, config: { vcpus: 1, ramMiB: 512, minRamMiB: 256 } }, admin)).status, 201);
  await http.call('POST', '/v1/admin/entitlements', { principalType: 'user', principal: 'alice', targetType: 'desktop', target: 'live-agent' }, admin);
  assert.equal((await http.call('PATCH', '/v1/admin/policies/desktop/live-agent', { replicationIntervalMin: 1 }, admin)).status, 200);
  const link = await relay(new URL(broker.url));
  const home = join(broker.dir, 'laptop-live-agent');
  await enroll(env(home), link.url, { fingerprint: broker.fingerprint, name: 'laptop-live-agent' });
  await checkout(env(home), 'live-agent');
  const model = new Model(readFileSync(path));
  const serve = await startServe(home, 'live-agent');
  const disk = await NbdClient.connect(serve.socket, 'disk0');
  const points = async () => ((await http.call('GET', '/v1/desktops/live-agent/restore-points', undefined, admin)).body as { restorePoints: { id: string; kind: string }[] }).restorePoints.filter((p) => p.kind === 'replica');
  try {
    const write = async (offset: number, size = 64 * 1024) => {
      const data = randomBytes(size);
      await disk.write(offset, data);
      model.writes.push({ offset, data });
    };
    await write(MIB);
    // Due (never replicated): the agent takes it live, the desktop running.
    const seen = logs.length;
    assert.equal((await runAgent(env(home), { once: true })).online, true);
    // In a process of its own at low priority (client/background.ts): its log, passed on by the agent, says so.
    assert.ok(logs.slice(seen).some((l) => /in the background: CPU priority nice 15/.test(l)), `the scheduled replica ran at nice 15:\n${logs.slice(seen).join('\n')}`);
    // It told the broker so: queued behind users' jobs, rebuilt on the transfer server in the idle class.
    const starts = ((await http.call('GET', '/v1/admin/events?desktop=live-agent&limit=1000', undefined, admin)).body.events as { action: string; detail: string | null }[]).filter((e) => e.action === 'transfer-start');
    assert.ok(starts.some((e) => /^replicate job .* \(background\)$/.test(e.detail ?? '')), `the agent's replica began as a background one: ${JSON.stringify(starts)}`);
    let { state } = await vaultState(home, 'live-agent');
    assert.equal(state.lastReplicaKind, 'crash-consistent');
    const first = await points();
    assert.equal(first.length, 1);
    assert.ok((await snapshotDisk('live-agent', first[0]!.id)).equals(model.at(1)));

    // The broker goes away: the heartbeat fails, nothing is frozen, the guest writes on.
    await link.down();
    await write(3 * MIB);
    const away = await runAgent(env(home), { once: true });
    assert.equal(away.online, false);
    ({ state } = await vaultState(home, 'live-agent'));
    assert.deepEqual([state.disks[0]!.under, state.disks[0]!.mergingTo], [null, null], 'no point left frozen while the broker is away');

    // Back, and due again (the interval passed): the agent replicates what was written meanwhile.
    await link.up();
    await vaultUpdate(home, 'live-agent', (s) => ({ ...s, lastReplicationAt: new Date(Date.now() - 120_000).toISOString() }));
    assert.equal((await runAgent(env(home), { once: true })).online, true);
    const second = await points();
    assert.equal(second.length, 2);
    const newest = second.find((p) => !first.some((f) => f.id === p.id))!;
    assert.ok((await snapshotDisk('live-agent', newest.id)).equals(model.at(2)), 'the replica after the outage holds the write made while the broker was away');

    // The policy's background rate holds (replicationRateKBps, here 128 KiB/s): 1 MiB of incompressible
    // writes, four 256 KiB pages frames, go in no less than 6 s (the limiter waits before each frame,
    // so the last one's 2 s are not waited). A lower bound only; unpaced, the whole run takes ≈ 2 s.
    assert.equal((await http.call('PATCH', '/v1/admin/policies/desktop/live-agent', { replicationRateKBps: 128 }, admin)).status, 200);
    for (let i = 0; i < 16; i++) await write(5 * MIB + i * 64 * 1024);
    await vaultUpdate(home, 'live-agent', (s) => ({ ...s, lastReplicationAt: new Date(Date.now() - 120_000).toISOString() }));
    const paced = performance.now();
    assert.equal((await runAgent(env(home), { once: true })).online, true);
    const took = (performance.now() - paced) / 1000;
    assert.equal((await points()).length, 3, 'the paced replica completed');
    assert.ok(took >= 5.5, `1 MiB at the policy's 128 KiB/s went in ${took.toFixed(1)} s`);
    // Scattered small writes: each frame counts at least a quarter chunk (the server rewrites the whole
    // chunk for it): 16 pages of 4 KiB in 16 chunks go as 1 MiB would, ≥ 7 s at 128 KiB/s, not ≈ 2 s.
    const third = await points();
    for (let i = 0; i < 16; i++) await write(i * 512 * 1024 + 8192, 4096);
    await vaultUpdate(home, 'live-agent', (s) => ({ ...s, lastReplicationAt: new Date(Date.now() - 120_000).toISOString() }));
    const scattered = performance.now();
    assert.equal((await runAgent(env(home), { once: true })).online, true);
    const tookScattered = (performance.now() - scattered) / 1000;
    assert.equal((await points()).length, 4, 'the scattered replica completed');
    assert.ok(tookScattered >= 6.5, `16 scattered 4 KiB pages at the policy's 128 KiB/s went in ${tookScattered.toFixed(1)} s`);
    const fourth = (await points()).find((p) => !third.some((f) => f.id === p.id))!;
    assert.ok((await snapshotDisk('live-agent', fourth.id)).equals(model.at(model.writes.length)), 'it holds every write');
  } finally {
    await disk.close();
    await stopServe(serve);
    await link.close();
  }
});

test('a running desktop (`carryon run`, QEMU paused): USB by policy from the command line, power events, a policy change detaching at once, and the agent\'s lock shutting it down and saying why; all of it audited', { skip: onPostgres && 'laptop-side only (run in the SQLite pass)' }, async () => {
  const name = 'usb-run';
  const path = makeImage(broker.dir, 4, `${name}.raw`);
  assert.equal((await http.call('POST', '/v1/admin/desktops', { name, image: path, config: { vcpus: 1, ramMiB: 256, minRamMiB: 128, usb: true } }, admin)).status, 201);
  await http.call('POST', '/v1/admin/entitlements', { principalType: 'user', principal: 'alice', targetType: 'desktop', target: name }, admin);
  assert.equal((await http.call('PATCH', `/v1/admin/policies/desktop/${name}`, { usbAllowed: true, usbStorageAllowed: false }, admin)).status, 200);
  const home = join(broker.dir, `laptop-${name}`);
  const { deviceId } = await enroll(env(home), broker.url, { fingerprint: broker.fingerprint, name: `laptop-${name}` });
  await checkout(env(home), name);
  // The laptop's USB devices: a keyboard and a stick (QEMU's usb-kbd and usb-storage stand in for them).
  const sysfs = join(broker.dir, `sysfs-${name}`);
  for (const [port, vendor, product, cls, devnum] of [['1-1', '046d', 'c31c', '03', 2], ['1-2', '0781', '5567', '08', 3]] as const) {
    for (const d of [port, `${port}:1.0`]) mkdirSync(join(sysfs, d), { recursive: true });
    for (const [k, v] of Object.entries({ idVendor: vendor, idProduct: product, bDeviceClass: '00', busnum: 1, devnum })) writeFileSync(join(sysfs, port, k), `${v}\n`);
    writeFileSync(join(sysfs, `${port}:1.0`, 'bInterfaceClass'), `${cls}\n`);
  }
  const seams = { CARRYON_TEST_USB_SYSFS: sysfs, CARRYON_TEST_USB_EMULATED: '1', CARRYON_TEST_POWEROFF_GRACE_MS: '1000' };
  const cli = (args: string[]) => runCarryon(home, args, seams);
  const run = spawn(process.execPath, [join(process.cwd(), 'dist', 'src', 'cli', 'main.js'), 'run', name, '--accel', 'tcg', '--display', 'none', '--qemu-arg=-S'], {
    env: { ...process.env, ...seams, CARRYON_HOME: home, CARRYON_USER: 'alice', CARRYON_PASSWORD: 'alice-password' }, stdio: ['ignore', 'pipe', 'pipe'],
  });
  let said = '';
  run.stderr!.setEncoding('utf8').on('data', (d: string) => (said += d));
  const ended = new Promise<number | null>((r) => run.once('exit', (code) => r(code)));
  try {
    // Up once its control socket answers.
    let up = await cli(['usb', 'attached', name]);
    for (let i = 0; i < 60 && up.code !== 0; i++) {
      await new Promise((r) => setTimeout(r, 500));
      up = await cli(['usb', 'attached', name]);
    }
    assert.equal(up.code, 0, `${up.out}\n${said}`);
    assert.match((await cli(['usb', 'list', name])).out, /0781:5567 .*storage \(08\) .*no: 0781:5567 is a mass-storage device/);
    const refused = await cli(['usb', 'attach', name, '0781:5567']);
    assert.deepEqual([refused.code, /refused: .*does not allow USB storage \[policy\]/.test(refused.out)], [1, true], refused.out);
    assert.equal((await cli(['usb', 'attach', name, '046d:c31c'])).code, 0);
    assert.match((await cli(['usb', 'attached', name])).out, /046d:c31c/);
    assert.match((await cli(['power', name, 'suspend'])).out, /paused/);
    assert.match((await cli(['power', name, 'resume'])).out, /runs again; its clock was not set/);

    // The admin denies the vendor; the agent brings it while the desktop runs: the keyboard goes at once.
    assert.equal((await http.call('PATCH', `/v1/admin/policies/desktop/${name}`, { usbDeny: ['046d:*'] }, admin)).status, 200);
    assert.equal((await runAgent(env(home), { once: true })).online, true);
    let attached = await cli(['usb', 'attached', name]);
    for (let i = 0; i < 20 && !/^none$/m.test(attached.out); i++) {
      await new Promise((r) => setTimeout(r, 250));
      attached = await cli(['usb', 'attached', name]);
    }
    assert.match(attached.out, /^none$/m, said);
    assert.match(said, /USB 046d:c31c at 1-2 detached: policy changed: 046d:c31c is on the policy's deny list/);

    // A lock from the admin: the agent stops the run, which says why, presses ACPI, and (a paused guest never answers) forces it after the bound.
    assert.equal((await http.call('POST', `/v1/admin/devices/${deviceId}/commands`, { type: 'lock', desktopId: name }, admin)).status, 201);
    await runAgent(env(home), { once: true });
    assert.equal(await ended, 0, said);
    assert.match(said, /an administrator locked this desktop: shutting the desktop down \(ACPI; forced after 1 s\)/);
    assert.match(said, /the guest did not power off within 1 s: QEMU was stopped \(quit\)/);
    await runAgent(env(home), { once: true });
    const audit = (await broker.ctx.meta.listEvents({ limit: 10_000 })).filter((e) => e.actor === `device:${deviceId}`).map((e) => `${e.action} ${e.detail ?? ''}`);
    for (const want of [/^offline-usb-refused .*0781:5567.*storage/, /^offline-usb-attach .*046d:c31c/, /^offline-usb-detach .*046d:c31c.*policy changed/, /^offline-power .*suspend: the guest is paused/, /^offline-guest-stop .*administrator locked/, /^offline-power-off .*administrator locked this desktop: the guest did not power off/]) {
      assert.ok(audit.some((a) => want.test(a)), `${want} in the audit:\n${audit.join('\n')}`);
    }
  } finally {
    run.kill('SIGKILL');
    await ended;
  }
});
