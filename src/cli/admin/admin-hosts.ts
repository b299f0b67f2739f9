import type { Command } from 'commander';
import { endpoint, enc, names, say, type Json } from './admin-shared.js';
import { ago, printTable } from '../format.js';

interface HostView {
  id: string; accel: string; health: string; lastSeen: string;
  capacity: { vcpus: number; ramMiB: number; desktops: number }; free: { vcpus: number; ramMiB: number; desktops: number };
  desktops: { desktopId: string; state: string; since: string; detail: string | null; pid: number | null }[];
}

/** `carryon admin hosts …`: the machines that run desktops online. */
export function registerHostAdminCommands(admin: Command): void {
  const hosts = admin.command('hosts').description('desktop hosts: capacity, what runs where, health');
  endpoint(hosts, { name: 'list', description: 'each host with its capacity (free / total), the desktops on it, and when it was last heard from', method: 'GET', path: () => '/v1/admin/hosts', human: async (r, _a, b) => {
    const name = await names(b, ['desktops']);
    printTable(r.hosts as HostView[], [
      { h: 'host', v: (h) => h.id }, { h: 'health', v: (h) => h.health }, { h: 'last seen', v: (h) => ago(h.lastSeen) }, { h: 'accel', v: (h) => h.accel },
      { h: 'vcpus', v: (h) => `${h.free.vcpus}/${h.capacity.vcpus}`, right: true }, { h: 'ram MiB', v: (h) => `${h.free.ramMiB}/${h.capacity.ramMiB}`, right: true },
      { h: 'desktops', v: (h) => h.desktops.map((d) => `${name(d.desktopId)} (${d.state}${d.pid ? ` pid ${d.pid}` : ''})`).join(', ') || '-' },
    ]);
  } });
  // The credential goes to stdout alone (`carryon admin hosts add h1 > h1.credential`); how to use it to stderr.
  endpoint(hosts, { name: 'add <host>', description: "make a desktop host's own credential (shown once; the broker keeps only its hash): put it in a 0600 file on that host and start `carryon host --secret-file FILE`",
    method: 'POST', path: () => '/v1/admin/hosts', body: ([h]) => ({ id: h }),
    human: (r) => {
      process.stderr.write(`credential of desktop host ${String(r.id)} (shown once): save it in a 0600 file on that host, then \`carryon host --secret-file FILE …\`\n`);
      say(String(r.credential));
    } });
  endpoint(hosts, { name: 'revoke <host>', description: 'cut a desktop host off at once: its credential is refused from its next request, its open displays close, and the desktops it ran are marked lost (fail them over or release them)',
    method: 'DELETE', path: ([h]) => `/v1/admin/hosts/${enc(h!)}`, human: (r) => say(`host ${String(r.revoked)}: credential revoked; the desktops it ran are marked lost`) });
  endpoint(hosts, { name: 'release <desktop>', description: "discard what the guest wrote on its host while it ran online (it is stopped, or its host is lost): the desktop is free for check-out again", method: 'POST',
    path: ([d]) => `/v1/admin/desktops/${enc(d!)}/release`, options: [['--reason <text>', 'goes to the audit trail'], ['--host <id>', 'the at-risk copy a lost host keeps after a fail-over']], body: (_a, o: Json) => ({ reason: o.reason, host: o.host }),
    human: (r, [d]) => say(`${d!}: released from host ${String(r.released)}; its online changes there are discarded`) });
  endpoint(hosts, { name: 'failover <desktop>', description: 'start a desktop whose host is lost on another host, from its last snapshot (what the guest wrote on the lost host since is at risk; that host keeps it until released)', method: 'POST',
    path: ([d]) => `/v1/admin/desktops/${enc(d!)}/failover`, options: [['--reason <text>', 'goes to the audit trail']], body: (_a, o: Json) => ({ reason: o.reason }),
    human: (r, [d]) => say(`${d!}: starting on host ${String(r.host)}; ${String(r.atRisk)}`) });
}
