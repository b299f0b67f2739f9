import type { Command } from 'commander';
import { z } from 'zod';
import { BrokerError, type BrokerClient } from '../../net/broker-client.js';
import { eventsCsv, type AuditEvent } from '../../core/audit-csv.js';
import { CarryonError } from '../../core/errors.js';
import { PolicyLayer } from '../../core/policy.js';
import { AnyObject, endpoint, enc, get, list, names, say, withAdmin, type Json } from './admin-shared.js';
import { printJsonOr } from '../common.js';
import { ago, bytes, left, percent, printTable, rate } from '../format.js';
import { OUT_OF_DATE } from '../../broker/gateway/routes.js';

type Resolved = Record<string, { value: unknown; source: string }>;
interface Job { id: string; kind: string; state: string; queuePosition?: number; checkoutId: string; user: string | null; desktop: string | null; serverId: string | null; bytesDone: number; bytesCopiedLocally?: number | null; percent: number | null; rate: number }

const LIST_POLICIES = ['usbClasses', 'usbAllow', 'usbDeny'];

/** `name=value` pairs as a policy layer; `name=inherit` (merge only) takes the key out of the layer. */
function parsePolicy(pairs: string[], replace: boolean): unknown {
  const out: Json = {};
  const inherited: string[] = [];
  for (const p of pairs) {
    const [k, v] = p.split('=');
    if (!k || v === undefined) throw new CarryonError('invalid', `policy values are name=value, got ${p}`);
    if (v === 'inherit') inherited.push(k);
    // Lists (USB classes and device IDs): comma-separated, empty for none; IDs as lsusb prints them, any case.
    else if (LIST_POLICIES.includes(k)) out[k] = v === '' ? [] : v.split(',').map((x) => x.trim().toLowerCase());
    else out[k] = v === 'true' ? true : v === 'false' ? false : Number.isNaN(Number(v)) ? v : Number(v);
  }
  if (replace && inherited.length) throw new CarryonError('invalid', `${inherited.join(', ')}=inherit: with --replace, leave the name out instead`);
  const parsed = PolicyLayer.safeParse(out);
  if (!parsed.success) throw new CarryonError('invalid', `bad policy: ${parsed.error.issues.map((i) => `${i.path.join('.')}: ${i.message}`).join('; ')}`);
  const unknown = inherited.filter((k) => !(k in PolicyLayer.shape));
  if (unknown.length) throw new CarryonError('invalid', `bad policy: unknown name ${unknown.join(', ')}`);
  return { ...parsed.data, ...Object.fromEntries(inherited.map((k) => [k, null])) };
}

/** The layers for (desktop, user) side by side, the effective value and the layer that won. */
async function policyLayers(b: BrokerClient, desktop?: string, user?: string) {
  const q = new URLSearchParams({ ...(user ? { user } : {}), ...(desktop ? { desktop } : {}) });
  const resolved = (await get(b, `/v1/admin/policies/resolve?${q}`)).policy as Resolved;
  const global = (await get(b, '/v1/admin/policies/resolve')).policy as Resolved;
  const layers: { title: string; values: Json }[] = [{ title: 'global', values: Object.fromEntries(Object.entries(global).filter(([, v]) => v.source === 'global').map(([k, v]) => [k, v.value])) }];
  const name = await names(b, ['pools', 'desktops']);
  if (desktop) {
    // The list carries each desktop's own layer (`show` answers with the resolved policy instead).
    const d = (await list<Json>(b, '/v1/admin/desktops', 'desktops')).find((x) => x.id === desktop || x.name === desktop);
    if (!d) throw new CarryonError('not-found', `no desktop ${desktop}`);
    if (d.poolId) layers.push({ title: `pool ${name(String(d.poolId))}`, values: ((await list<{ id: string; policy: Json }>(b, '/v1/admin/pools', 'pools')).find((p) => p.id === d.poolId)?.policy ?? {}) });
    layers.push({ title: `desktop ${String(d.name)}`, values: d.policy as Json });
  }
  if (user) layers.push({ title: `user ${user}`, values: (await list<{ name: string; policy: Json }>(b, '/v1/admin/users', 'users')).find((u) => u.name === user)?.policy ?? {} });
  const source = (s: string) => s.replace(/^(pool|desktop|user):(.*)$/, (_m, k: string, id: string) => `${k} ${k === 'user' ? id : name(id)}`);
  return { resolved, layers, source };
}

export function registerOpsCommands(admin: Command): void {
  const pol = admin.command('policies').description('policies: global → pool → desktop → user');
  pol.command('set <scope> <id> [values...]')
    .description('change the keys named in a layer, others kept: `set desktop win11 maxLeaseHours=48 usbAllowed=inherit` (inherit: take the key out of this layer; scope: global|pool|desktop|user; id "-" for global)')
    .option('--replace', 'the values given become the whole layer: keys not named are taken out (no values: an empty layer that inherits everything)')
    .action(async (scope: string, id: string, vals: string[], o: { replace?: boolean }, cmd: Command) => {
      const body = parsePolicy(vals, Boolean(o.replace));
      await withAdmin(cmd, async (b, g) => {
        const r = await b.call(o.replace ? 'PUT' : 'PATCH', `/v1/admin/policies/${enc(scope)}/${enc(id)}`, body, AnyObject);
        const layer = Object.entries((r.policy ?? {}) as Json).map(([k, v]) => `${k}=${String(v)}`).join(' ');
        printJsonOr(Boolean(g.json), r, () => say(`${scope}${scope === 'global' ? '' : ` ${id}`} layer now: ${layer || '(empty: inherits everything)'}`));
      });
    });
  pol.command('show').description('the layers side by side, the effective value and the layer that won').option('--for-user <name>', 'user').option('--desktop <desktop>', 'desktop')
    .action(async (o: { forUser?: string; desktop?: string }, cmd: Command) => {
      await withAdmin(cmd, async (b, g) => {
        const { resolved, layers, source } = await policyLayers(b, o.desktop, o.forUser);
        printJsonOr(Boolean(g.json), { policy: resolved }, () => printTable(Object.entries(resolved), [
          { h: 'policy', v: ([k]) => k }, ...layers.map((l) => ({ h: l.title, v: ([k]: [string, unknown]) => (l.values[k] === undefined ? '' : String(l.values[k])) })),
          { h: 'effective', v: ([, p]) => String(p.value) }, { h: 'source', v: ([, p]) => source(p.source) },
        ]));
      });
    });

  const co = admin.command('checkouts').description('check-outs and locks');
  endpoint(co, { name: 'list', description: 'active check-outs with their transfer progress', method: 'GET', path: () => '/v1/admin/checkouts', human: async (r, _a, b) => {
    const name = await names(b, ['desktops', 'devices']);
    // Each check-out carries its job's numbers (the broker's, the same as `admin transfers` shows).
    printTable(r.checkouts as { id: string; desktopId: string; user: string; deviceId: string; state: string; leaseExpiresAt: string; failure?: string | null; transfer?: Omit<Job, 'id' | 'checkoutId' | 'user' | 'desktop' | 'serverId'> | null }[], [
      { h: 'desktop', v: (c) => name(c.desktopId) }, { h: 'user', v: (c) => c.user }, { h: 'device', v: (c) => name(c.deviceId) }, { h: 'state', v: (c) => (c.failure ? `failed: ${c.failure}` : c.state) },
      { h: 'transfer', v: (c) => { const j = c.transfer; return j ? (j.state === 'queued' ? `queued #${j.queuePosition ?? '?'}` : `${j.kind} ${percent(j.percent)} ${rate(j.rate)}`.trim()) : ''; } },
      { h: 'lease', v: (c) => left(c.leaseExpiresAt) }, { h: 'id', v: (c) => c.id },
    ]);
  } });
  co.command('force-unlock <checkout-or-desktop>').description('end a check-out and unlock the desktop (the laptop\'s changes since its last check-in or replica are not kept)').option('--reason <text>', 'why (goes to the audit trail)')
    .action(async (ref: string, o: { reason?: string }, cmd: Command) => {
      await withAdmin(cmd, async (b, g) => {
        const active = await list<{ id: string; desktopId: string }>(b, '/v1/admin/checkouts', 'checkouts');
        const name = await names(b, ['desktops']);
        const c = active.find((x) => x.id === ref || x.desktopId === ref || name(x.desktopId) === ref);
        const r = await b.call('POST', `/v1/admin/checkouts/${enc(c?.id ?? ref)}/force-unlock`, { reason: o.reason }, AnyObject);
        printJsonOr(Boolean(g.json), r, () => say(`unlocked ${c ? name(c.desktopId) : ref}${o.reason ? ` (${o.reason})` : ''}`));
      });
    });

  const dev = admin.command('devices').description('enrolled laptops');
  endpoint(dev, { name: 'list', description: 'devices, last heartbeat and host statistics', method: 'GET', path: () => '/v1/admin/devices', human: (r) =>
    printTable(r.devices as { id: string; user: string; name: string; lastSeen: string | null; host: Json; latest: { time: string; stats: { host?: Json; vaultBytes?: number; desktops?: unknown[] } } | null; update?: { ring: string; runningVersion: string | null; state: string | null; targetVersion: string | null } }[], [
      { h: 'name', v: (d) => d.name }, { h: 'user', v: (d) => d.user }, { h: 'heartbeat', v: (d) => ago(d.latest?.time ?? d.lastSeen) },
      { h: 'cpus', v: (d) => (d.latest?.stats.host ?? d.host).cpus, right: true }, { h: 'ram', v: (d) => bytes((d.latest?.stats.host ?? d.host).ramBytes), right: true },
      { h: 'free disk', v: (d) => bytes((d.latest?.stats.host ?? d.host).freeDiskBytes), right: true },
      { h: 'load', v: (d) => ((d.latest?.stats.host?.loadAvg as number[] | undefined)?.[0]?.toFixed(2) ?? ''), right: true },
      { h: 'vault', v: (d) => bytes(d.latest?.stats.vaultBytes), right: true }, { h: 'desktops', v: (d) => d.latest?.stats.desktops?.length ?? '', right: true },
      { h: 'version', v: (d) => d.update?.runningVersion ?? '?' }, { h: 'ring', v: (d) => d.update?.ring ?? 'stable' },
      { h: 'update', v: (d) => (d.update?.state ? `${d.update.targetVersion ?? ''} ${d.update.state}` : '') }, { h: 'id', v: (d) => d.id },
    ]) });
  endpoint(dev, { name: 'command <device> <lock|unlock|wipe|replicate|renew-lease> [desktop]', description: 'queue a remote command for the device\'s agent', method: 'POST', path: ([d]) => `/v1/admin/devices/${enc(d!)}/commands`,
    body: ([, type, desktopId]) => ({ type, desktopId }), human: (r, [d, type]) => say(`queued ${type!} for ${d!} (${String(r.id)}); see \`carryon admin devices commands\` for the ack`) });
  endpoint(dev, { name: 'ring <device> <ring>', description: 'put a device in the canary or stable ring (client releases roll out to canary first)', method: 'POST', path: ([d]) => `/v1/admin/devices/${enc(d!)}/ring`,
    body: ([, ring]) => ({ ring }), human: (r) => say(`${String(r.deviceId)}: ring ${String(r.ring)}`) });
  endpoint(dev, { name: 'commands', description: 'remote commands and their acknowledgements, newest first', method: 'GET', path: () => '/v1/admin/commands', human: async (r, _a, b) => {
    const name = await names(b, ['desktops', 'devices']);
    printTable((r.commands as { id: string; deviceId: string; desktopId: string | null; type: string; state: string; result: string | null; createdAt: string }[]).slice().reverse(), [
      { h: 'sent', v: (c) => ago(c.createdAt) }, { h: 'device', v: (c) => name(c.deviceId) }, { h: 'command', v: (c) => c.type }, { h: 'desktop', v: (c) => name(c.desktopId) },
      { h: 'ack', v: (c) => (c.state === 'pending' ? 'waiting for the agent' : c.state) }, { h: 'result', v: (c) => c.result },
    ]);
  } });
  dev.command('revoke <device>').description('revoke a device: it can no longer log in, heartbeat or renew leases')
    .action(async (device: string, _o: unknown, cmd: Command) => {
      await withAdmin(cmd, async (b, g) => {
        try {
          printJsonOr(Boolean(g.json), await b.call('POST', `/v1/admin/devices/${enc(device)}/revoke`, {}, AnyObject), () => say(`revoked ${device}`));
        } catch (err) {
          if (err instanceof BrokerError && err.status === 404 && /no route/.test(err.message)) throw new CarryonError('unsupported', 'this broker cannot revoke devices (it has no POST /v1/admin/devices/:id/revoke)');
          throw err;
        }
      });
    });

  endpoint(admin, { name: 'transfers', description: 'transfer servers, slots in use, queue, and each job\'s user, desktop, progress and rate', method: 'GET', path: () => '/v1/admin/transfers', human: (r) => {
    printTable(r.servers as { id: string; url: string; slots: number; inUse: number; alive: boolean; rateIn: number; rateOut: number; bytesOut: number; bytesIn: number }[], [
      { h: 'server', v: (s) => s.id }, { h: 'url', v: (s) => s.url }, { h: 'slots', v: (s) => `${s.inUse}/${s.slots}`, right: true }, { h: 'state', v: (s) => (s.alive ? 'alive' : 'silent') },
      { h: 'out', v: (s) => rate(s.rateOut), right: true }, { h: 'in', v: (s) => rate(s.rateIn), right: true }, { h: 'sent', v: (s) => bytes(s.bytesOut), right: true }, { h: 'received', v: (s) => bytes(s.bytesIn), right: true },
    ]);
    say('');
    printTable([...(r.active as Job[]), ...(r.queued as Job[])], [
      { h: 'kind', v: (j) => j.kind }, { h: 'user', v: (j) => j.user }, { h: 'desktop', v: (j) => j.desktop }, { h: 'state', v: (j) => (j.state === 'queued' ? `queued #${j.queuePosition ?? '?'}` : j.state) },
      { h: 'server', v: (j) => j.serverId }, { h: 'progress', v: (j) => percent(j.percent), right: true }, { h: 'moved', v: (j) => bytes(j.bytesDone), right: true }, { h: 'copied on laptop', v: (j) => (j.bytesCopiedLocally ? bytes(j.bytesCopiedLocally) : ''), right: true }, { h: 'rate', v: (j) => rate(j.rate), right: true },
    ]);
    const gw = r.gateway as { url: string; upToDate: boolean; configMadeAt: string | null } | null | undefined;
    if (gw) say(`\ngateway ${gw.url}: ${gw.upToDate ? `config up to date (made ${gw.configMadeAt!})` : OUT_OF_DATE}`);
  } });

  const Events = z.object({ events: z.array(z.object({ id: z.number(), time: z.string(), actor: z.string(), desktopId: z.string().nullable(), action: z.string(), outcome: z.string(), detail: z.string().nullable() })) });
  admin.command('events').description('audit trail, newest first').option('--desktop <desktop>', 'only this desktop').option('--actor <name>', 'only this actor').option('--action <action>', 'only this action')
    .option('--outcome <ok|denied|failed|info>', 'only this outcome').option('--search <text>', 'text in actor, action, outcome or detail').option('--limit <n>', 'how many', '200')
    .option('--csv', 'export as CSV (all matching events unless --limit)').option('--follow', 'print new events as they happen (oldest first)')
    .action(async (o: { desktop?: string; actor?: string; action?: string; outcome?: string; search?: string; limit: string; csv?: boolean; follow?: boolean }, cmd: Command) => {
      await withAdmin(cmd, async (b, g) => {
        const limitGiven = cmd.getOptionValueSource('limit') === 'cli';
        const q = new URLSearchParams({ limit: o.csv && !limitGiven ? '100000' : o.limit, ...(o.desktop ? { desktop: o.desktop } : {}), ...(o.actor ? { actor: o.actor } : {}), ...(o.action ? { action: o.action } : {}), ...(o.outcome ? { outcome: o.outcome } : {}), ...(o.search ? { q: o.search } : {}) });
        const { events } = await b.call('GET', `/v1/admin/audit?${q}`, undefined, Events);
        const name = await names(b, ['desktops']);
        const print = (evs: AuditEvent[]) => printTable(evs, [{ h: 'time', v: (e) => e.time.replace('T', ' ').slice(0, 19) }, { h: 'when', v: (e) => ago(e.time) }, { h: 'actor', v: (e) => e.actor },
          { h: 'action', v: (e) => e.action }, { h: 'outcome', v: (e) => e.outcome }, { h: 'desktop', v: (e) => name(e.desktopId) }, { h: 'detail', v: (e) => e.detail }]);
        if (o.csv) return void process.stdout.write(eventsCsv(events));
        printJsonOr(Boolean(g.json), events, () => print(events));
        if (!o.follow) return;
        let since = events[0]?.id ?? 0;
        for (;;) {
          const f = new URLSearchParams({ since: String(since), wait: '25', ...(o.desktop ? { desktop: o.desktop } : {}) });
          const { events: fresh } = await b.call('GET', `/v1/admin/events?${f}`, undefined, Events);
          if (fresh.length) since = fresh[fresh.length - 1]!.id;
          if (fresh.length) printJsonOr(Boolean(g.json), fresh, () => print(fresh));
        }
      });
    });
}
