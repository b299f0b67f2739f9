import { randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { rm } from 'node:fs/promises';
import { join } from 'node:path';
import { request } from 'undici';
import { checkout, release, upload, type ClientEnv } from '../src/client/ops.js';
import { serveDesktop } from '../src/client/ops/serve.js';
import { decodeManifest } from '../src/core/chunks/manifest.js';
import { writeTestImage } from '../src/demo/image.js';
import type { Chain } from '../src/disk/chain.js';
import { addChain, StorageDaemon } from '../src/disk/storage-daemon.js';
import { hostChain } from '../src/host/keys.js';
import { startHost } from '../src/host/service.js';
import { makeCredential } from '../src/broker/hosts/credentials.js';
import { NbdClient } from '../src/nbd/client.js';
import { pinnedAgent } from '../src/net/pinned-agent.js';
import { MB, settle, timed } from './lib/measure.js';
import { Rig } from './lib/rig.js';
import type { BenchRow, BenchSection } from './types.js';

const WRITE = 64 * 1024;

/** `changeBytes` of random 64 KiB writes at random aligned offsets, through an NBD client. */
async function writeRandom(c: NbdClient, size: number, changeBytes: number): Promise<void> {
  for (let i = 0; i < Math.round(changeBytes / WRITE); i++) await c.write(Math.floor(Math.random() * (size / WRITE)) * WRITE, randomBytes(WRITE));
  await c.flush();
}

/** Writes into the host's chain of a stopped desktop as its guest would (a storage daemon's writable export of the top). */
async function writeHostChain(chain: Chain, runDir: string, size: number, changeBytes: number): Promise<void> {
  const qsd = await StorageDaemon.start(runDir);
  try {
    await addChain(qsd, { files: chain.files, secretId: 'sec-t', baseSecretId: 'sec-b', baseReadOnly: true, prefix: 'w' }, chain.secret, chain.baseSecret);
    await qsd.exportNbd(join(runDir, 'w.sock'), [{ node: 'w-top', name: 'disk0', writable: true }]);
    const c = await NbdClient.connect(join(runDir, 'w.sock'), 'disk0');
    await writeRandom(c, size, changeBytes);
    await c.close();
  } finally {
    await qsd.stop();
  }
}

/**
 * Issue 26's done-when rows: the check-out of a desktop that runs on a desktop host (the host shuts
 * it down, sends back what it wrote, the laptop pulls the checkpoint) against the check-out of the
 * same desktop stopped, and the host's re-sync after a laptop's check-in. The host runs in this
 * process with its guest paused (`-S`): ACPI is never answered, so the shutdown is the forced one
 * after a 1 s grace, and the target allows that measured shutdown.
 */
export function onlineSection(work: string, sizeGiB: number, changeGiB: number): BenchSection {
  return {
    name: `Online desktop: check-out of a ${sizeGiB} GiB desktop running on a host (${(changeGiB * 1024).toFixed(0)} MiB written there) vs stopped; host re-sync after a check-in`,
    async run() {
      const rows: BenchRow[] = [];
      const size = sizeGiB * 2 ** 30;
      const dir = join(work, `online-${sizeGiB}`);
      const image = join(work, `online-${sizeGiB}.raw`);
      await writeTestImage(image, size, 'mixed');
      const rig = await Rig.start(dir, image);
      const agent = pinnedAgent(rig.broker.fingerprint);
      const hostLog: string[] = [];
      // The host's own credential, as `carryon admin hosts add bench-host` makes it.
      const credential = makeCredential('bench-host');
      await rig.broker.ctx.hosts.addKey('bench-host', credential.hash, 'bench');
      const host = await startHost({
        id: 'bench-host', brokerUrl: rig.broker.url, brokerFingerprint: rig.broker.fingerprint, secret: credential.credential,
        dataDir: join(dir, 'host'), vcpus: 2, ramMiB: 4096, maxDesktops: 2, accel: 'tcg', heartbeatSec: 1, shutdownGraceSec: 1, pausedGuests: true, log: (l) => hostLog.push(l),
      });
      try {
        const call = async (path: string, body: unknown, token?: string) => {
          const res = await request(`${rig.broker.url}${path}`, { method: 'POST', dispatcher: agent, headers: { 'content-type': 'application/json', ...(token ? { authorization: `Bearer ${token}` } : {}) }, body: JSON.stringify(body) });
          const json = (await res.body.json()) as Record<string, unknown>;
          if (res.statusCode >= 400) throw new Error(`${path}: ${JSON.stringify(json)}`);
          return json;
        };
        const admin = String((await call('/v1/auth/login', { username: 'admin', password: 'bench-admin-pw' })).token);
        const meta = rig.broker.ctx.meta;
        const desk = (await meta.getDesktop('desk'))!;
        const placedAs = async (state: string | null) => {
          for (let i = 0; i < 6000; i++, await new Promise((r) => setTimeout(r, 100))) if (((await rig.broker.ctx.hosts.placement(desk.id))?.state ?? null) === state) return;
          throw new Error(`desk never became ${state}: ${hostLog.slice(-3).join(' | ')}`);
        };
        const power = async (action: string, then: string) => (await call('/v1/admin/desktops/desk/power', { action }, admin), await placedAs(then));

        // The peer: the same desktop, stopped (in no host), checked out by a fresh laptop.
        const peer = await rig.laptop();
        await settle();
        const stopped = await timed(() => checkout(peer, 'desk'));
        await release(peer, 'desk', 'rollback');

        // Online: a first start fills the host's base; the guest's writes (1%) land in its top; it runs again.
        await power('on', 'running');
        await power('off', 'stopped');
        await writeHostChain(hostChain(readFileSync(join(dir, 'host', 'host.key')), join(dir, 'host'), desk.id, 'disk0'), join(dir, 'w-run'), size, changeGiB * 2 ** 30);
        await power('on', 'running');
        const hostBase = (await rig.broker.ctx.hosts.placement(desk.id))!.snapshotId!;
        const laptop: ClientEnv = await rig.laptop();
        await settle();
        const mark = (await meta.listEvents({ desktopId: desk.id, limit: 10_000 })).reduce((n, e) => Math.max(n, e.id), 0);
        const online = await timed(() => checkout(laptop, 'desk'));
        const onlineEnd = Date.now();
        // Where the time went, from the desktop's events: the host's part (request → checkpoint committed) and the rest.
        const steps = (await meta.listEvents({ desktopId: desk.id, sinceId: mark, limit: 10_000 })).sort((a, b) => a.id - b.id);
        const at = (action: string, actor?: string) => Date.parse(steps.find((e) => e.action === action && (!actor || e.actor === actor))?.time ?? '');
        const asked = at('handover-request');
        const hostPart = (at('snapshot', 'host:bench-host') - asked) / 1000;
        const shutDownAt = (at('guest-shutdown') - asked) / 1000;
        const shutdown = Number(/^handover \S+: .* after ([\d.]+) s$/m.exec(hostLog.join('\n'))?.[1] ?? NaN);
        // The laptop's two fetches: the old snapshot ahead (during the host's part), the changed chunks after the commit.
        const ahead = online.value.prefetched;
        const afterCommit = (onlineEnd - at('snapshot', 'host:bench-host')) / 1000;
        const phases = `fetched ahead ${ahead ? `${ahead.chunks} chunks${ahead.completeAfterMs === null ? ' (cut off at the commit)' : ` in ${(ahead.completeAfterMs / 1000).toFixed(2)} s`}, ${ahead.kept} kept` : 'nothing'}; after the commit ${online.value.chunksMoved} chunks (${(online.value.bytesMoved / MB).toFixed(1)} MB) in ${afterCommit.toFixed(2)} s`;
        const bound = stopped.seconds + shutdown + 2;
        rows.push({ section: 'online', name: `check-out of a ${sizeGiB} GiB desktop running on a host, ${(changeGiB * 1024).toFixed(0)} MiB written there: request to "safe to go offline"`, value: online.seconds, unit: 's', runs: 1, spread: 0,
          peer: { name: 'check-out of the same desktop stopped', value: stopped.seconds, unit: 's' },
          note: `guest shutdown ${shutdown.toFixed(2)} s (paused guest: forced after a 1 s grace); host's part ${hostPart.toFixed(2)} s (guest off at ${shutDownAt.toFixed(2)} s, then pages sent and committed); ${phases}; target ≤ stopped + shutdown + 2 s = ${bound.toFixed(2)} s: ${online.seconds <= bound ? 'met' : 'MISSED'}` });

        // Re-sync: the laptop writes 1% and checks in; the host, which kept its base, pulls only the chunks that changed since it.
        const served = await serveDesktop(laptop, 'desk');
        try {
          const c = await NbdClient.connect(served.socketPath, 'disk0');
          await writeRandom(c, size, changeGiB * 2 ** 30);
          await c.close();
        } finally {
          await served.close();
        }
        await upload(laptop, 'desk', 'checkin');
        const manifestOf = async (snapshot: string) => decodeManifest((await rig.broker.ctx.store.getManifest((await meta.getSnapshot(snapshot))!.disks[0]!.digest))!);
        const before = await manifestOf(hostBase);
        const after = await manifestOf((await meta.getDesktop('desk'))!.currentSnapshot!);
        const changed = after.chunks.filter((id, i) => id !== null && id !== before.chunks[i]).length;
        hostLog.length = 0;
        await power('on', 'running');
        const pulled = /(\d+) chunks \/ (\d+) bytes pulled/.exec(hostLog.join('\n'));
        const bytes = Number(pulled?.[2] ?? NaN);
        const ratio = bytes / (changed * after.chunkSize);
        rows.push({ section: 'online', name: `host re-sync after a laptop's check-in (${(changeGiB * 1024).toFixed(0)} MiB written): bytes pulled`, value: bytes / MB, unit: 'MB', runs: 1, spread: 0,
          note: `${pulled?.[1] ?? '?'} chunks pulled, ${changed} changed since the host's base (${(changed * after.chunkSize / MB).toFixed(1)} MB); ${ratio.toFixed(3)}× (target ≤ 1.05: ${ratio <= 1.05 ? 'met' : 'MISSED'})` });
        await power('off', 'stopped');
      } finally {
        await host.close();
        await agent.close();
        await rig.close();
        await rm(dir, { recursive: true, force: true, maxRetries: 5 });
        await rm(image, { force: true });
      }
      return rows;
    },
  };
}
