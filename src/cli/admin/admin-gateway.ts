import type { Command } from 'commander';
import { z } from 'zod';
import { OUT_OF_DATE } from '../../broker/gateway/routes.js';
import { writeFileAtomic } from '../../files/atomic.js';
import { say, withAdmin } from './admin-shared.js';
import { printJsonOr } from '../common.js';
import { printTable } from '../format.js';

const Status = z.object({
  url: z.string(), domain: z.string(), serverSetHash: z.string(), configMadeAt: z.string().nullable(), upToDate: z.boolean(),
  routes: z.array(z.object({ id: z.string(), kind: z.enum(['broker', 'transfer']), names: z.array(z.string()), address: z.string() })),
});
const Made = z.object({ config: z.string(), status: Status });

/**
 * `carryon admin gateway-config`: haproxy's configuration for the servers registered now (TLS
 * passthrough routed by SNI). The broker records what it was made for; `admin transfers` and
 * `admin gateway-status` say when servers changed and it must be made again.
 */
export function registerGatewayCommands(admin: Command): void {
  admin.command('gateway-config').description('write the haproxy configuration of the gateway for the registered broker and transfer servers')
    .option('--out <file>', 'write it here (default: standard output)')
    .option('--bind <addr>', 'haproxy bind address (default: every address, the gateway\'s port)')
    .option('--stats-socket <path>', 'add an haproxy stats socket (`show stat`)')
    .action(async (o: { out?: string; bind?: string; statsSocket?: string }, cmd: Command) => {
      await withAdmin(cmd, async (b, g) => {
        const made = await b.call('POST', '/v1/admin/gateway/config', { ...(o.bind ? { bind: o.bind } : {}), ...(o.statsSocket ? { statsSocket: o.statsSocket } : {}) }, Made);
        if (o.out) await writeFileAtomic(o.out, made.config, 0o644);
        else if (!g.json) process.stdout.write(made.config);
        const tell = o.out ? say : (l: string) => void process.stderr.write(`${l}\n`);
        printJsonOr(Boolean(g.json), o.out ? made.status : made, () => {
          if (o.out) tell(`wrote ${o.out}: ${made.status.routes.length} backends behind ${made.status.url}`);
          tell('check it with `haproxy -c -f FILE`, then reload haproxy; regenerate whenever `carryon admin gateway-status` or `admin transfers` says it is out of date (a transfer server added, moved or renamed)');
        });
      });
    });
  admin.command('gateway-status').description('the gateway laptops are given, the names routed behind it, and whether its haproxy config is up to date')
    .action(async (_o: unknown, cmd: Command) => {
      await withAdmin(cmd, async (b, g) => {
        const { gateway } = await b.call('GET', '/v1/admin/gateway', undefined, z.object({ gateway: Status.nullable() }));
        printJsonOr(Boolean(g.json), gateway, () => {
          if (!gateway) return say('no gateway: laptops are given the servers\' own addresses (start the broker with --gateway HOST:PORT --gateway-domain NAME)');
          say(`gateway ${gateway.url}, names under ${gateway.domain}`);
          printTable(gateway.routes, [{ h: 'server', v: (r) => r.id }, { h: 'SNI name', v: (r) => r.names.join(' ') }, { h: 'forwards to', v: (r) => r.address }]);
          say(gateway.upToDate ? `config up to date (made ${gateway.configMadeAt!})` : OUT_OF_DATE);
        });
      });
    });
}
