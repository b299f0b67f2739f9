import type { Command } from 'commander';
import { z } from 'zod';
import { BrokerClient } from '../client/broker-client.js';
import { CarryonError } from '../core/errors.js';
import { PolicyLayer } from '../core/policy.js';
import { byteProgress, passwordSource, printJsonOr, table } from './common.js';

interface AdminOpts { url?: string; fingerprint?: string; user?: string; passwordFile?: string; json?: boolean }
type Json = Record<string, unknown>;
const AnyObject = z.record(z.string(), z.unknown());

async function withAdmin<T>(cmd: Command, fn: (b: BrokerClient, o: AdminOpts) => Promise<T>): Promise<T> {
  const o = cmd.optsWithGlobals<AdminOpts>();
  const url = o.url ?? process.env.CARRYON_URL;
  const fp = o.fingerprint ?? process.env.CARRYON_FINGERPRINT;
  const user = o.user ?? process.env.CARRYON_USER;
  if (!url || !fp || !user) throw new CarryonError('invalid', 'admin commands need --url, --fingerprint and --user (or CARRYON_URL, CARRYON_FINGERPRINT, CARRYON_USER)');
  const broker = new BrokerClient(url.replace(/\/$/, ''), fp);
  try {
    await broker.login(user, await passwordSource(o)());
    return await fn(broker, o);
  } finally {
    await broker.close();
  }
}

/** Adds a subcommand that calls one admin endpoint and prints a table or JSON. */
function endpoint(parent: Command, spec: { name: string; description: string; method: 'GET' | 'POST' | 'PUT' | 'PATCH' | 'DELETE'; path: (args: string[], o: Json) => string; body?: (args: string[], o: Json) => unknown; list?: string; columns?: string[]; options?: [string, string][] }) {
  const c = parent.command(spec.name).description(spec.description);
  for (const [flags, desc] of spec.options ?? []) c.option(flags, desc);
  c.action(async (...raw: unknown[]) => {
    const cmd = raw[raw.length - 1] as Command;
    const args = cmd.args;
    const o = cmd.opts<Json>();
    await withAdmin(cmd, async (b, g) => {
      const res = await b.call(spec.method, spec.path(args, o), spec.body?.(args, o), AnyObject);
      printJsonOr(Boolean(g.json), res, () => {
        if (spec.list) table(((res[spec.list] as Json[] | undefined) ?? []).map((r) => r), spec.columns);
        else process.stdout.write(`${Object.entries(res).map(([k, v]) => `${k}: ${typeof v === 'object' ? JSON.stringify(v) : String(v)}`).join('\n')}\n`);
      });
    });
  });
  return c;
}

function parsePolicy(pairs: string[]): unknown {
  const out: Json = {};
  for (const p of pairs) {
    const [k, v] = p.split('=');
    if (!k || v === undefined) throw new CarryonError('invalid', `policy values are name=value, got ${p}`);
    out[k] = v === 'true' ? true : v === 'false' ? false : Number.isNaN(Number(v)) ? v : Number(v);
  }
  const parsed = PolicyLayer.safeParse(out);
  if (!parsed.success) throw new CarryonError('invalid', `bad policy: ${parsed.error.issues.map((i) => `${i.path.join('.')}: ${i.message}`).join('; ')}`);
  return parsed.data;
}

const enc = encodeURIComponent;

export function registerAdminCommands(program: Command): void {
  const admin = program.command('admin').description('administer a broker over its API')
    .option('--url <url>', 'broker URL (env CARRYON_URL)')
    .option('--fingerprint <sha256>', 'pinned broker certificate fingerprint (env CARRYON_FINGERPRINT)')
    .option('--user <name>', 'admin user (env CARRYON_USER)')
    .option('--password-file <file>', 'read the password from a file (else CARRYON_PASSWORD or a prompt)')
    .option('--json', 'machine-readable output');

  const users = admin.command('users').description('local users');
  endpoint(users, { name: 'list', description: 'list users', method: 'GET', path: () => '/v1/admin/users', list: 'users', columns: ['name', 'role', 'source', 'disabled'] });
  endpoint(users, { name: 'add <name>', description: 'add a user (password: NEW_USER_PASSWORD)', method: 'POST', path: () => '/v1/admin/users', options: [['--role <role>', 'admin or user']],
    body: ([name], o) => ({ name, password: process.env.NEW_USER_PASSWORD ?? (() => { throw new CarryonError('invalid', 'set NEW_USER_PASSWORD'); })(), role: o.role ?? 'user' }) });
  endpoint(users, { name: 'disable <name>', description: 'disable a user', method: 'PATCH', path: ([n]) => `/v1/admin/users/${enc(n!)}`, body: () => ({ disabled: true }) });
  endpoint(users, { name: 'delete <name>', description: 'delete a user', method: 'DELETE', path: ([n]) => `/v1/admin/users/${enc(n!)}` });

  const groups = admin.command('groups').description('groups');
  endpoint(groups, { name: 'list', description: 'list groups', method: 'GET', path: () => '/v1/admin/groups', list: 'groups' });
  endpoint(groups, { name: 'add <name> [members...]', description: 'create a group / add members', method: 'POST', path: () => '/v1/admin/groups', body: ([name, ...members]) => ({ name, members }) });

  const pools = admin.command('pools').description('desktop pools');
  endpoint(pools, { name: 'list', description: 'list pools', method: 'GET', path: () => '/v1/admin/pools', list: 'pools', columns: ['id', 'name', 'policy'] });
  endpoint(pools, { name: 'add <name>', description: 'create a pool', method: 'POST', path: () => '/v1/admin/pools', body: ([name]) => ({ name }) });

  const desktops = admin.command('desktops').description('desktops');
  endpoint(desktops, { name: 'list', description: 'list desktops', method: 'GET', path: () => '/v1/admin/desktops', list: 'desktops', columns: ['id', 'name', 'poolId', 'currentSnapshot', 'checkout'] });
  endpoint(desktops, { name: 'show <desktop>', description: 'desktop, snapshots, checkout, resolved policy', method: 'GET', path: ([d]) => `/v1/admin/desktops/${enc(d!)}` });
  desktops.command('create <name> <image>').description('import an image (raw, qcow2, vmdk, vdi) on the broker host as a new desktop')
    .option('--pool <pool>', 'pool').option('--vcpus <n>', 'vCPUs', '2').option('--ram <mib>', 'RAM in MiB', '2048').option('--min-ram <mib>', 'least RAM offline', '512')
    .option('--usb', 'USB devices allowed').option('--chunk-size <bytes>', 'chunk size (power of two, 64 KiB–4 MiB)').option('--quiet', 'no progress output')
    .action(async (name: string, image: string, o: { pool?: string; vcpus: string; ram: string; minRam: string; usb?: boolean; chunkSize?: string; quiet?: boolean }, cmd: Command) => {
      const num = (flag: string, v: string) => {
        const n = Number(v);
        if (!Number.isInteger(n) || n <= 0) throw new CarryonError('invalid', `${flag} must be a positive whole number, got ${v}`);
        return n;
      };
      const body = { name, image, pool: o.pool, background: true, chunkSize: o.chunkSize ? num('--chunk-size', o.chunkSize) : undefined,
        config: { vcpus: num('--vcpus', o.vcpus), ramMiB: num('--ram', o.ram), minRamMiB: num('--min-ram', o.minRam), nic: 'user', usb: Boolean(o.usb) } };
      await withAdmin(cmd, async (b, g) => {
        let job = ((await b.call('POST', '/v1/admin/desktops', body, AnyObject)).import ?? {}) as Json;
        const progress = byteProgress(`import ${name}`, Boolean(o.quiet || g.json));
        // Poll until the broker says done or failed (bounded by the import itself, not by a timeout).
        while (job.state === 'running') {
          progress.update(Number(job.bytesDone), Number(job.bytesTotal));
          await new Promise((r) => setTimeout(r, 500));
          job = ((await b.call('GET', `/v1/admin/imports/${enc(String(job.id))}`, undefined, AnyObject)).import ?? {}) as Json;
        }
        progress.stop();
        if (job.state !== 'done') {
          const e = (job.error ?? {}) as { code?: string; message?: string };
          throw new CarryonError(e.code ?? 'import-failed', `import of ${image} failed: ${e.message ?? 'unknown error'}`);
        }
        const r = (job.result ?? {}) as Json;
        printJsonOr(Boolean(g.json), r, () => process.stdout.write(`desktop ${name} (${String(r.id)}): ${String(r.chunksStored)} chunks stored, ${String(r.chunksDeduped)} deduplicated, ${String(r.holes)} holes\n`));
      });
    });
  endpoint(admin.command('imports').description('desktop imports running or finished since the broker started'), { name: 'list', description: 'list imports', method: 'GET', path: () => '/v1/admin/imports', list: 'imports', columns: ['id', 'name', 'state', 'bytesDone', 'bytesTotal', 'startedAt'] });
  endpoint(desktops, { name: 'clone <golden> <name>', description: 'clone from a golden image (shares chunks)', method: 'POST', path: () => '/v1/admin/desktops', options: [['--pool <pool>', 'pool']], body: ([golden, name], o) => ({ name, cloneOf: golden, pool: o.pool }) });
  endpoint(desktops, { name: 'delete <desktop>', description: 'delete a desktop (refused while checked out)', method: 'DELETE', path: ([d]) => `/v1/admin/desktops/${enc(d!)}` });
  endpoint(desktops, { name: 'power <desktop> <on|off>', description: 'power the datacenter copy (refused while locked)', method: 'POST', path: ([d]) => `/v1/admin/desktops/${enc(d!)}/power`, body: ([, action]) => ({ action }) });

  const ent = admin.command('entitlements').description('who may use which desktop or pool');
  endpoint(ent, { name: 'list', description: 'list entitlements', method: 'GET', path: () => '/v1/admin/entitlements', list: 'entitlements' });
  endpoint(ent, { name: 'add <user|group> <principal> <desktop|pool> <target>', description: 'entitle a user or group', method: 'POST', path: () => '/v1/admin/entitlements', body: ([principalType, principal, targetType, target]) => ({ principalType, principal, targetType, target }) });
  endpoint(ent, { name: 'remove <id>', description: 'remove an entitlement', method: 'DELETE', path: ([id]) => `/v1/admin/entitlements/${enc(id!)}` });

  const pol = admin.command('policies').description('policies: global → pool → desktop → user');
  endpoint(pol, { name: 'set <scope> <id> [values...]', description: 'replace a layer, e.g. `set desktop win11 maxLeaseHours=48 usbAllowed=false` (scope: global|pool|desktop|user; id "-" for global)', method: 'PUT', path: ([s, id]) => `/v1/admin/policies/${enc(s!)}/${enc(id!)}`, body: ([, , ...vals]) => parsePolicy(vals) });
  endpoint(pol, { name: 'show', description: 'resolved policy with sources', method: 'GET', options: [['--for-user <name>', 'user'], ['--desktop <desktop>', 'desktop']],
    path: (_a, o) => `/v1/admin/policies/resolve?${new URLSearchParams({ ...(o.forUser ? { user: String(o.forUser) } : {}), ...(o.desktop ? { desktop: String(o.desktop) } : {}) })}` });

  const co = admin.command('checkouts').description('checkouts and locks');
  endpoint(co, { name: 'list', description: 'active checkouts', method: 'GET', path: () => '/v1/admin/checkouts', list: 'checkouts', columns: ['id', 'desktopId', 'user', 'deviceId', 'state', 'leaseExpiresAt'] });
  endpoint(co, { name: 'force-unlock <checkout>', description: 'end a checkout and unlock the desktop', method: 'POST', path: ([id]) => `/v1/admin/checkouts/${enc(id!)}/force-unlock`, body: () => ({}) });

  const dev = admin.command('devices').description('enrolled laptops');
  endpoint(dev, { name: 'list', description: 'devices and their latest statistics', method: 'GET', path: () => '/v1/admin/devices', list: 'devices', columns: ['id', 'user', 'name', 'lastSeen'] });
  endpoint(dev, { name: 'command <device> <lock|unlock|wipe|replicate|renew-lease> [desktop]', description: 'queue a remote command for the agent', method: 'POST', path: ([d]) => `/v1/admin/devices/${enc(d!)}/commands`, body: ([, type, desktopId]) => ({ type, desktopId }) });
  endpoint(admin, { name: 'transfers', description: 'transfer servers, slots in use, queue, throughput', method: 'GET', path: () => '/v1/admin/transfers', list: 'servers', columns: ['id', 'url', 'slots', 'inUse', 'alive', 'rateIn', 'rateOut'] });

  admin.command('events').description('audit trail').option('--desktop <desktop>', 'only this desktop').option('--follow', 'keep printing new events').option('--limit <n>', 'how many', '200')
    .action(async (o: { desktop?: string; follow?: boolean; limit: string }, cmd: Command) => {
      await withAdmin(cmd, async (b, g) => {
        let since = 0;
        const Events = z.object({ events: z.array(z.object({ id: z.number(), time: z.string(), actor: z.string(), desktopId: z.string().nullable(), action: z.string(), outcome: z.string(), detail: z.string().nullable() })) });
        for (let round = 0; round < (o.follow ? 1_000_000 : 1); round++) {
          const q = new URLSearchParams({ since: String(since), limit: o.limit, ...(o.desktop ? { desktop: o.desktop } : {}), ...(o.follow && round > 0 ? { wait: '25' } : {}) });
          const { events } = await b.call('GET', `/v1/admin/events?${q}`, undefined, Events);
          if (events.length) since = events[events.length - 1]!.id;
          printJsonOr(Boolean(g.json), events, () => (events.length || !o.follow ? table(events, ['time', 'actor', 'action', 'outcome', 'desktopId', 'detail']) : undefined));
        }
      });
    });
}
