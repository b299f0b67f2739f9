import { randomBytes } from 'node:crypto';
import { execFile } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { promisify } from 'node:util';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { request } from 'undici';
import { startBroker } from '../broker/start.js';
import { formatBytes } from '../cli/common.js';
import { checkout, enroll, exportDisk, upload, type ClientEnv } from '../client/ops.js';
import { exportCurrentSnapshot } from '../broker/desktops/snapshot-image.js';
import { serveDesktop } from '../client/ops/serve.js';
import { pinnedAgent } from '../net/pinned-agent.js';
import { writeTestImage } from './image.js';

const run = promisify(execFile);

/**
 * The main job on one box: a broker with its transfer server on 127.0.0.1, a desktop made from
 * a generated image, a laptop that checks it out, changes 1% of it, and checks it back in.
 */
async function main(): Promise<void> {
  const sizeMiB = Number(process.env.DEMO_SIZE_MIB ?? 256);
  const dir = mkdtempSync(join(tmpdir(), 'carryon-demo-'));
  const say = (s: string) => process.stdout.write(`${s}\n`);
  const keep = process.argv.includes('--keep-running');
  const portArg = process.argv.indexOf('--port');
  const port = portArg > 0 ? Number(process.argv[portArg + 1]) : Number(process.env.DEMO_PORT ?? 0);
  const broker = await startBroker({ dataDir: join(dir, 'server'), port, initAdmin: { name: 'admin', password: 'demo-admin-password' }, importDirs: [dir] });
  try {
    say(`broker on ${broker.url} (certificate ${broker.fingerprint.slice(0, 16)}…), transfer server ${broker.transfer!.url}`);
    const agent = pinnedAgent(broker.fingerprint);
    const call = async (method: 'POST' | 'GET' | 'PUT', path: string, body?: unknown, token?: string) => {
      const res = await request(`${broker.url}${path}`, { method, dispatcher: agent, headers: { 'content-type': 'application/json', ...(token ? { authorization: `Bearer ${token}` } : {}) }, body: body ? JSON.stringify(body) : undefined });
      const json = (await res.body.json()) as Record<string, unknown>;
      if (res.statusCode >= 400) throw new Error(`${path}: ${JSON.stringify(json)}`);
      return json;
    };
    const admin = String((await call('POST', '/v1/auth/login', { username: 'admin', password: 'demo-admin-password' })).token);
    await call('POST', '/v1/admin/users', { name: 'alice', password: 'alice-demo-password' }, admin);
    const image = join(dir, 'desktop.raw');
    await writeTestImage(image, sizeMiB * 1024 * 1024, 'mixed');
    const created = await call('POST', '/v1/admin/desktops', { name: 'win11-finance', image, config: { vcpus: 2, ramMiB: 2048, minRamMiB: 512 } }, admin);
    say(`imported a ${sizeMiB} MiB desktop: ${String(created.chunksStored)} chunks stored, ${String(created.holes)} holes, ${formatBytes(Number(created.bytesStored))} in the store`);
    await call('POST', '/v1/admin/entitlements', { principalType: 'user', principal: 'alice', targetType: 'desktop', target: 'win11-finance' }, admin);
    // The demo compares the laptop's disk with the server's: that needs a plaintext export, which policy must allow.
    await call('PUT', '/v1/admin/policies/desktop/win11-finance', { exportAllowed: true }, admin);
    await agent.close();

    const env: ClientEnv = { home: join(dir, 'laptop'), user: 'alice', password: async () => 'alice-demo-password', log: (l) => say(`  laptop: ${l}`), pollMs: 200 };
    await enroll(env, broker.url, { fingerprint: broker.fingerprint, name: 'alice-laptop' });
    const t0 = Date.now();
    const out0 = broker.transfer!.stats.bytesOut;
    await checkout(env, 'win11-finance');
    const checkoutMs = Date.now() - t0;
    const bytesOut = broker.transfer!.stats.bytesOut - out0;

    // Work offline: 1% of the disk changes in random 64 KiB writes, through NBD as a VM's would
    // (qemu-io against the served socket), or straight into the vault disk without qemu-io.
    const writes = Math.max(1, Math.round((sizeMiB * 1024 * 1024 * 0.01) / 65536));
    const offsets = Array.from({ length: writes }, () => Math.floor(Math.random() * ((sizeMiB * 1024 * 1024) / 65536)) * 65536);
    const served = await serveDesktop(env, 'win11-finance');
    try {
      // Each write its own random data (qemu-io reads a write's data from a file).
      const patterns = offsets.map((_, i) => {
        const file = join(dir, `write-${i}.bin`);
        writeFileSync(file, randomBytes(65536));
        return file;
      });
      const uri = `nbd+unix:///disk0?socket=${served.socketPath}`;
      const args = ['-f', 'raw', ...offsets.flatMap((o, i) => ['-c', `write -q -s ${patterns[i]} ${o} 64k`]), '-c', 'flush', uri];
      await run('qemu-io', args);
      say(`  laptop: ${writes} writes through NBD (${uri}) into the encrypted qcow2 chain`);
    } finally {
      await served.close();
    }
    // What the laptop's disk now holds, exported in plaintext for the comparison below.
    const laptopCopy = join(dir, 'laptop-disk.raw');
    await exportDisk(env, 'win11-finance', laptopCopy, 'raw');
    const laptopDisk = readFileSync(laptopCopy);
    const t1 = Date.now();
    const in0 = broker.transfer!.stats.bytesIn;
    const ci = await upload(env, 'win11-finance', 'checkin');
    const checkinMs = Date.now() - t1;
    const bytesBack = broker.transfer!.stats.bytesIn - in0;
    const full = statSync(image).size;

    say('');
    say('| step | Carryon on the wire | time | a full copy would move |');
    say('| --- | --- | --- | --- |');
    say(`| check-out | ${formatBytes(bytesOut)} | ${(checkoutMs / 1000).toFixed(2)} s | ${formatBytes(full)} |`);
    say(`| check-in after ${writes} random 64 KiB writes (1%) | ${formatBytes(bytesBack)} (${ci.chunksSent} chunks) | ${(checkinMs / 1000).toFixed(2)} s | ${formatBytes(full)} |`);
    // Proof: the broker's new snapshot, re-assembled from its store, is the laptop's disk.
    const serverCopy = join(dir, 'server-snapshot.raw');
    const { snapshotId } = await exportCurrentSnapshot(broker.ctx, 'win11-finance', serverCopy);
    if (!readFileSync(serverCopy).equals(laptopDisk)) throw new Error("the server's new snapshot differs from the laptop's disk");
    say('');
    say(`demo complete: checked out, changed through NBD, checked in; the broker's new snapshot ${snapshotId.slice(0, 8)}… is byte-identical to the laptop's disk.`);
    if (keep) await keepRunning(broker.url, broker.fingerprint, say);
  } finally {
    await broker.close();
    rmSync(dir, { recursive: true, force: true });
  }
}

/** `--keep-running`: the broker stays up for the web console and `carryon admin` until Ctrl-C. */
async function keepRunning(url: string, fingerprint: string, say: (s: string) => void): Promise<void> {
  say('');
  say(`web console: ${url}/   (self-signed certificate, SHA-256 ${fingerprint}: accept it in the browser)`);
  say('log in as admin / demo-admin-password (or as the user alice / alice-demo-password)');
  say(`command line: CARRYON_URL=${url} CARRYON_FINGERPRINT=${fingerprint} CARRYON_USER=admin CARRYON_PASSWORD=demo-admin-password carryon admin desktops list`);
  say('the broker keeps running until Ctrl-C');
  await new Promise<void>((resolve) => {
    process.once('SIGINT', resolve);
    process.once('SIGTERM', resolve);
  });
}

main().catch((err: unknown) => {
  process.stderr.write(`demo failed: ${err instanceof Error ? err.stack : String(err)}\n`);
  process.exit(1);
});
