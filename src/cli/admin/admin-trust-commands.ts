import type { Command } from 'commander';
import { writeFile } from 'node:fs/promises';
import { request } from 'undici';
import { z } from 'zod';
import { CarryonError } from '../../core/errors.js';
import { pinnedAgent } from '../../net/pinned-agent.js';
import { enc, withAdmin } from './admin-shared.js';
import { printJsonOr } from '../common.js';

/** `admin audit verify` and `admin audit export` (registered after registerAdminCommands). */
export function registerAdminTrustCommands(program: Command): void {
  const admin = program.commands.find((c) => c.name() === 'admin');
  if (!admin) throw new Error('register the admin commands first');
  const audit = admin.command('audit').description('the tamper-evident audit trail');
  audit.command('verify').description('check the hash chain of the whole trail; prints its head (record it elsewhere to catch truncation)')
    .action(async (_o: unknown, cmd: Command) => {
      await withAdmin(cmd, async (b, g) => {
        const r = await b.call('GET', '/v1/admin/audit/verify', undefined, z.object({ ok: z.boolean(), events: z.number(), head: z.string(), brokenAt: z.number().optional(), reason: z.string().optional() }));
        printJsonOr(Boolean(g.json), r, () => process.stdout.write(r.ok ? `audit chain ok: ${r.events} events, head ${r.head}\n` : `audit chain BROKEN at event ${r.brokenAt}: ${r.reason} (${r.events} events verify before it)\n`));
        if (!r.ok) throw new CarryonError('audit-broken', `the audit chain is broken at event ${r.brokenAt}`);
      });
    });
  audit.command('export').description('events as JSON lines (each with its hash and the previous one\'s)')
    .option('--since <id>', 'only events after this id', '0').option('--output <file>', 'write here instead of standard output')
    .action(async (o: { since: string; output?: string }, cmd: Command) => {
      await withAdmin(cmd, async (b, g) => {
        const agent = pinnedAgent(g.fingerprint);
        try {
          const res = await request(`${b.url}/v1/admin/audit/export?since=${enc(o.since)}`, { dispatcher: agent, headers: { authorization: `Bearer ${b.token}` } });
          const text = await res.body.text();
          if (res.statusCode >= 400) throw new CarryonError('export-failed', `broker answered ${res.statusCode}: ${text.slice(0, 300)}`);
          if (o.output) await writeFile(o.output, text, { mode: 0o600 });
          else process.stdout.write(text);
        } finally {
          await agent.close();
        }
      });
    });
}
