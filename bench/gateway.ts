import { spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import { rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { checkout, discardLocal, release } from '../src/client/ops.js';
import { writeTestImage } from '../src/demo/image.js';
import { run, settle, stats, timed } from './lib/measure.js';
import { freePort } from '../test/support/ports.js';
import { Rig } from './lib/rig.js';
import type { BenchRow, BenchSection } from './types.js';

/** Debian puts haproxy in /usr/sbin, which a non-root user's PATH lacks. */
const HAPROXY = ['/usr/sbin/haproxy', '/usr/local/sbin/haproxy'].find((p) => existsSync(p)) ?? 'haproxy';


/**
 * A check-out through the gateway (haproxy in TCP mode, TLS passed through by SNI) against the
 * same check-out straight to the transfer server, same broker, same desktop, alternating runs.
 * Done when the gateway costs at most 1.15× (issue 28).
 */
export function gatewaySection(work: string, sizeGiB: number, pairs = 4): BenchSection {
  return {
    name: `Check-out of a ${sizeGiB} GiB desktop through the gateway (haproxy, TLS passthrough) vs direct`,
    async run() {
      const dir = join(work, `gateway-${sizeGiB}`);
      const image = join(work, `gateway-${sizeGiB}.raw`);
      await writeTestImage(image, sizeGiB * 2 ** 30, 'mixed');
      const port = await freePort();
      const gateway = { address: `127.0.0.1:${port}`, domain: 'gw.bench' };
      const rig = await Rig.start(dir, image, undefined, { gateway });
      const cfg = join(dir, 'haproxy.cfg');
      await writeFile(cfg, await rig.gatewayConfig({ bind: gateway.address }));
      await run(HAPROXY, ['-c', '-q', '-f', cfg]);
      const haproxy = spawn(HAPROXY, ['-db', '-f', cfg], { stdio: 'ignore' });
      try {
        const settings = rig.broker.ctx.settings;
        const routed = settings.gateway;
        const direct = await rig.laptop();
        const viaGateway = await rig.laptop(`https://${gateway.address}`);
        const once = async (env: typeof direct, through: boolean) => {
          // The broker's one setting decides which route tickets name: off for the direct run.
          settings.gateway = through ? routed : undefined;
          await settle();
          const { seconds } = await timed(() => checkout(env, 'desk'));
          await release(env, 'desk', 'rollback');
          await discardLocal(env, 'desk'); // the next run fetches every chunk again
          return seconds;
        };
        const ours: number[] = [];
        const theirs: number[] = [];
        for (let i = 0; i < pairs; i++) {
          // Alternating order: a slow spell of the shared box lands on both.
          if (i % 2) {
            ours.push(await once(viaGateway, true));
            theirs.push(await once(direct, false));
          } else {
            theirs.push(await once(direct, false));
            ours.push(await once(viaGateway, true));
          }
        }
        settings.gateway = routed;
        const g = stats(ours);
        const d = stats(theirs);
        const ratio = g.median / d.median;
        const row: BenchRow = {
          section: 'gateway', name: `check-out through the gateway, ${sizeGiB} GiB mixed image: wall time`, value: g.median, unit: 's', runs: g.runs, spread: g.spread,
          peer: { name: 'the same check-out direct', value: d.median, unit: 's' },
          // Each pair's own ratio too: the goal counts as met when consecutive pairs each meet it.
          note: `${ratio.toFixed(2)}× direct (target ≤ 1.15: ${ratio <= 1.15 ? 'met' : 'MISSED'}); pairs ${ours.map((o, i) => (o / theirs[i]!).toFixed(2)).join(', ')}; haproxy 2.6 on the same 2 cores`,
        };
        return [row];
      } finally {
        haproxy.kill();
        await rig.close();
        await rm(dir, { recursive: true, force: true, maxRetries: 5 });
        await rm(image, { force: true });
      }
    },
  };
}
