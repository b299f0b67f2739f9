import { randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { request } from 'undici';
import { startBroker } from '../broker/start.js';
import { formatBytes } from '../cli/common.js';
import { checkout, enroll, upload, withDisks, type ClientEnv } from '../client/ops.js';
import { pinnedAgent } from '../net/pinned-agent.js';
import { writeTestImage } from './image.js';

/**
 * The main job on one box: a broker with its transfer server on 127.0.0.1, a desktop made from
 * a generated image, a laptop that checks it out, changes 1% of it, and checks it back in.
 */
async function main(): Promise<void> {
  const sizeMiB = Number(process.env.DEMO_SIZE_MIB ?? 256);
  const dir = mkdtempSync(join(tmpdir(), 'carryon-demo-'));
  const say = (s: string) => process.stdout.write(`${s}\n`);
  const broker = await startBroker({ dataDir: join(dir, 'server'), initAdmin: { name: 'admin', password: 'demo-admin-password' } });
  try {
    say(`broker on ${broker.url} (certificate ${broker.fingerprint.slice(0, 16)}…), transfer server ${broker.transfer!.url}`);
    const agent = pinnedAgent(broker.fingerprint);
    const call = async (method: 'POST' | 'GET', path: string, body?: unknown, token?: string) => {
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
    await agent.close();

    const env: ClientEnv = { home: join(dir, 'laptop'), user: 'alice', password: async () => 'alice-demo-password', log: (l) => say(`  laptop: ${l}`), pollMs: 200 };
    await enroll(env, broker.url, { fingerprint: broker.fingerprint, name: 'alice-laptop' });
    const t0 = Date.now();
    const out0 = broker.transfer!.stats.bytesOut;
    await checkout(env, 'win11-finance');
    const checkoutMs = Date.now() - t0;
    const bytesOut = broker.transfer!.stats.bytesOut - out0;

    // Work offline: 1% of the disk changes in random 64 KiB writes.
    const writes = Math.max(1, Math.round((sizeMiB * 1024 * 1024 * 0.01) / 65536));
    await withDisks(env, 'win11-finance', async ([d]) => {
      const disk = d!.disk;
      for (let i = 0; i < writes; i++) {
        const off = Math.floor(Math.random() * (disk.size / 65536)) * 65536;
        await disk.write(off, randomBytes(65536));
      }
      await disk.flush();
    });
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
    say('');
    say('demo complete: checked out, changed, checked in; the broker holds the new snapshot.');
  } finally {
    await broker.close();
    rmSync(dir, { recursive: true, force: true });
  }
}

main().catch((err: unknown) => {
  process.stderr.write(`demo failed: ${err instanceof Error ? err.stack : String(err)}\n`);
  process.exit(1);
});
