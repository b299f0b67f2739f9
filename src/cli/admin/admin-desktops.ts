import { open, stat } from 'node:fs/promises';
import { basename } from 'node:path';
import type { Command } from 'commander';
import { request } from 'undici';
import type { BrokerClient } from '../../net/broker-client.js';
import { CarryonError } from '../../core/errors.js';
import { pinnedAgent } from '../../net/pinned-agent.js';
import { registerExportCommand } from './admin-export.js';
import { AnyObject, endpoint, enc, list, names, say, withAdmin, type Json } from './admin-shared.js';
import { byteProgress, printJsonOr } from '../common.js';
import { ago, bytes, left, percent, printFields, printTable } from '../format.js';

interface Desktop { id: string; name: string; poolId: string | null; config: { vcpus: number; ramMiB: number; disks: { sizeBytes: number }[] }; policy: Json; currentSnapshot: string | null; powerState: string; createdAt: string; checkout: { id: string; user: string; state: string; leaseExpiresAt: string } | null }
interface RestorePoint { id: string; kind: string; createdAt: string; sizeBytes: number; current: boolean }

const num = (flag: string, v: string) => {
  const n = Number(v);
  if (!Number.isInteger(n) || n <= 0) throw new CarryonError('invalid', `${flag} must be a positive whole number, got ${v}`);
  return n;
};
const diskSize = (d: Desktop) => d.config.disks.reduce((n, x) => n + x.sizeBytes, 0);
const state = (d: Desktop) => (d.checkout ? `${d.checkout.state} by ${d.checkout.user}` : 'available');

/** Polls an import job to its end with a progress display; prints the new desktop. */
async function followImport(b: BrokerClient, job: Json, label: string, quiet: boolean, json: boolean): Promise<void> {
  const progress = byteProgress(label, quiet || json);
  while (job.state === 'running') {
    progress.update(Number(job.bytesDone), Number(job.bytesTotal));
    await new Promise((r) => setTimeout(r, 500));
    job = ((await b.call('GET', `/v1/admin/imports/${enc(String(job.id))}`, undefined, AnyObject)).import ?? {}) as Json;
  }
  progress.stop();
  if (job.state !== 'done') {
    const e = (job.error ?? {}) as { code?: string; message?: string };
    throw new CarryonError(e.code ?? 'import-failed', `import of ${String(job.name)} failed: ${e.message ?? 'unknown error'}`);
  }
  const r = (job.result ?? {}) as Json;
  printJsonOr(json, r, () => say(`desktop ${String(job.name)} (${String(r.id)}): ${String(r.chunksStored)} chunks stored, ${String(r.chunksDeduped)} deduplicated, ${String(r.holes)} holes, ${bytes(r.bytesStored)} in the store`));
}

const PIECE = 8 * 1024 * 1024;

/** Sends `file` from the offset the broker already has, in pieces; a failed piece is retried from where the broker stopped. */
async function sendUpload(b: BrokerClient, fp: string, id: string, file: string, size: number, quiet: boolean): Promise<void> {
  const agent = pinnedAgent(fp);
  const fh = await open(file, 'r');
  const progress = byteProgress(`upload ${basename(file)}`, quiet);
  try {
    let received = Number((await b.call('GET', `/v1/admin/uploads/${id}`, undefined, AnyObject)).received);
    for (let failures = 0; received < size; ) {
      progress.update(received, size);
      const len = Math.min(PIECE, size - received);
      const buf = Buffer.alloc(len);
      await fh.read(buf, 0, len, received);
      try {
        const res = await request(`${b.url}/v1/admin/uploads/${id}?offset=${received}`, { method: 'PUT', dispatcher: agent, headers: { 'content-type': 'application/octet-stream', authorization: `Bearer ${b.token}` }, body: buf });
        const body = (await res.body.json()) as Json;
        if (res.statusCode >= 400 && res.statusCode !== 409) throw new CarryonError(String(body.error ?? 'upload-failed'), String(body.message ?? `HTTP ${res.statusCode}`));
        received = Number(body.received);
        failures = 0;
      } catch (err) {
        if (++failures > 5) throw new CarryonError('upload-failed', `upload stopped at ${bytes(received)}: ${(err as Error).message}; run again with --resume ${id}`);
        await new Promise((r) => setTimeout(r, 500 * failures));
        received = Number((await b.call('GET', `/v1/admin/uploads/${id}`, undefined, AnyObject)).received);
      }
    }
    progress.update(size, size);
  } finally {
    progress.stop();
    await fh.close();
    await agent.close();
  }
}

type CreateOpts = { pool?: string; vcpus: string; ram: string; minRam: string; usb?: boolean; chunkSize?: string; quiet?: boolean; resume?: string };
const config = (o: CreateOpts) => ({ vcpus: num('--vcpus', o.vcpus), ramMiB: num('--ram', o.ram), minRamMiB: num('--min-ram', o.minRam), nic: 'user', usb: Boolean(o.usb) });
const createOptions = (c: Command) => c.option('--pool <pool>', 'pool').option('--vcpus <n>', 'vCPUs', '2').option('--ram <mib>', 'RAM in MiB', '2048').option('--min-ram <mib>', 'least RAM offline', '512')
  .option('--usb', 'USB devices allowed').option('--chunk-size <bytes>', 'chunk size (power of two, 64 KiB–4 MiB)').option('--quiet', 'no progress output');

export function registerDesktopCommands(admin: Command): void {
  const desktops = admin.command('desktops').description('desktops, imports, clones, restore points');
  endpoint(desktops, { name: 'list', description: 'list desktops', method: 'GET', path: () => '/v1/admin/desktops', human: async (res, _a, b) => {
    const name = await names(b, ['pools']);
    printTable(res.desktops as Desktop[], [
      { h: 'name', v: (d) => d.name }, { h: 'pool', v: (d) => name(d.poolId) }, { h: 'state', v: state },
      { h: 'disk', v: (d) => bytes(diskSize(d)), right: true }, { h: 'vcpus', v: (d) => d.config.vcpus, right: true }, { h: 'ram', v: (d) => `${d.config.ramMiB} MiB`, right: true },
      { h: 'lease', v: (d) => (d.checkout ? left(d.checkout.leaseExpiresAt) : '') }, { h: 'created', v: (d) => ago(d.createdAt) },
    ]);
  } });
  endpoint(desktops, { name: 'show <desktop>', description: 'a desktop: config, check-out, restore points, resolved policy', method: 'GET', path: ([d]) => `/v1/admin/desktops/${enc(d!)}`, human: async (res, _a, b) => {
    const d = res as unknown as Desktop & { snapshots: { id: string; kind: string; createdAt: string }[]; policy: Record<string, { value: unknown; source: string }> };
    const name = await names(b, ['pools', 'desktops']);
    printFields([['name', d.name], ['id', d.id], ['pool', name(d.poolId) || '(none)'], ['state', state(d)], ['lease', d.checkout ? left(d.checkout.leaseExpiresAt) : ''],
      ['disk', bytes(diskSize(d))], ['vcpus', d.config.vcpus], ['ram', `${d.config.ramMiB} MiB`], ['power', d.powerState], ['created', ago(d.createdAt)]]);
    say('\nrestore points:');
    printTable((await b.call('GET', `/v1/desktops/${enc(d.id)}/restore-points`, undefined, AnyObject)).restorePoints as RestorePoint[], [
      { h: 'id', v: (p) => p.id }, { h: 'kind', v: (p) => p.kind }, { h: 'created', v: (p) => ago(p.createdAt) }, { h: 'current', v: (p) => (p.current ? 'yes' : '') },
    ]);
    say('\npolicy (no user):');
    printTable(Object.entries(d.policy), [{ h: 'policy', v: ([k]) => k }, { h: 'value', v: ([, p]) => String(p.value) }, { h: 'source', v: ([, p]) => p.source.replace(/^(pool|desktop):(.*)$/, (_m, k: string, id: string) => `${k} ${name(id)}`) }]);
  } });
  createOptions(desktops.command('create <name> <image>').description('import an image (raw, qcow2, vmdk, vdi) as a new desktop; <image> is an absolute path ON THE BROKER HOST (use `upload` for a file on this machine)'))
    .action(async (name: string, image: string, o: CreateOpts, cmd: Command) => {
      const body = { name, image, pool: o.pool, background: true, chunkSize: o.chunkSize ? num('--chunk-size', o.chunkSize) : undefined, config: config(o) };
      await withAdmin(cmd, async (b, g) => {
        const job = ((await b.call('POST', '/v1/admin/desktops', body, AnyObject)).import ?? {}) as Json;
        await followImport(b, job, `import ${name}`, Boolean(o.quiet), Boolean(g.json));
      });
    });
  createOptions(desktops.command('upload <name> <file>').description('send an image from this machine to the broker (streamed, resumable) and import it as a new desktop'))
    .option('--resume <upload>', 'continue an interrupted upload (its id was printed when it started)')
    .action(async (name: string, file: string, o: CreateOpts, cmd: Command) => {
      const size = (await stat(file)).size;
      await withAdmin(cmd, async (b, g) => {
        const id = o.resume ?? String((await b.call('POST', '/v1/admin/uploads', { name: basename(file), sizeBytes: size }, AnyObject)).id);
        if (!g.json && !o.quiet) process.stderr.write(`upload ${id} (${bytes(size)}); if it is interrupted: carryon admin desktops upload ${name} ${file} --resume ${id}\n`);
        await sendUpload(b, g.fingerprint, id, file, size, Boolean(o.quiet || g.json));
        const job = ((await b.call('POST', `/v1/admin/uploads/${enc(id)}/import`, { name, pool: o.pool, chunkSize: o.chunkSize ? num('--chunk-size', o.chunkSize) : undefined, config: config(o) }, AnyObject)).import ?? {}) as Json;
        await followImport(b, job, `import ${name}`, Boolean(o.quiet), Boolean(g.json));
      });
    });
  endpoint(desktops, { name: 'clone <golden> <name>', description: 'clone from a golden image (shares chunks)', method: 'POST', path: () => '/v1/admin/desktops', options: [['--pool <pool>', 'pool']],
    body: ([golden, name], o) => ({ name, cloneOf: golden, pool: o.pool }), human: (r, [golden, name]) => say(`desktop ${name!} (${String(r.id)}) cloned from ${golden!}`) });
  endpoint(desktops, { name: 'delete <desktop>', description: 'delete a desktop (refused while checked out)', method: 'DELETE', path: ([d]) => `/v1/admin/desktops/${enc(d!)}`, human: (_r, [d]) => say(`deleted ${d!}`) });
  endpoint(desktops, { name: 'power <desktop> <on|off|reset|shutdown>', description: 'run the desktop on a desktop host (on), power it off, reset it, or shut it down (ACPI, then forced); refused while checked out', method: 'POST',
    path: ([d]) => `/v1/admin/desktops/${enc(d!)}/power`, body: ([, action]) => ({ action }), human: (r, [d, a]) => say(`${d!}: power ${a!}: ${String(r.state)} on ${String(r.host)}`) });
  endpoint(desktops, { name: 'restore-points <desktop>', description: 'restore points (snapshots to go back to), newest first', method: 'GET', path: ([d]) => `/v1/desktops/${enc(d!)}/restore-points`, human: (r) => {
    printTable(r.restorePoints as RestorePoint[], [
      { h: 'id', v: (p) => p.id }, { h: 'kind', v: (p) => p.kind }, { h: 'created', v: (p) => ago(p.createdAt) }, { h: 'size', v: (p) => bytes(p.sizeBytes), right: true }, { h: 'current', v: (p) => (p.current ? 'yes' : '') },
    ]);
    if (!r.canRestore && r.reason) say(`(cannot restore now: ${String(r.reason)})`);
  } });
  endpoint(desktops, { name: 'restore <desktop> <restore-point>', description: 'make a restore point the desktop\'s current version (the next check-out starts from it)', method: 'POST',
    path: ([d]) => `/v1/desktops/${enc(d!)}/restore`, options: [['--reason <text>', 'goes to the audit trail']], body: ([, snapshotId], o) => ({ snapshotId, reason: o.reason }),
    human: (r, [d]) => say(`${d!} restored from ${String(r.restoredFrom)} (new current version ${String(r.snapshotId)})`) });

  registerExportCommand(desktops);

  endpoint(admin.command('imports').description('desktop imports running or finished since the broker started'), { name: 'list', description: 'list imports', method: 'GET', path: () => '/v1/admin/imports', human: (r) =>
    printTable((r.imports as Json[]).slice().reverse(), [
      { h: 'name', v: (j) => j.name }, { h: 'state', v: (j) => j.state }, { h: 'progress', v: (j) => percent(Number(j.bytesTotal) ? (Number(j.bytesDone) / Number(j.bytesTotal)) * 100 : 0), right: true },
      { h: 'size', v: (j) => bytes(j.bytesTotal), right: true }, { h: 'started', v: (j) => ago(j.startedAt) }, { h: 'error', v: (j) => (j.error as { message?: string } | null)?.message },
    ]) });

  const pools = admin.command('pools').description('desktop pools');
  endpoint(pools, { name: 'list', description: 'list pools', method: 'GET', path: () => '/v1/admin/pools', human: async (r, _a, b) => {
    const ds = await list<Desktop>(b, '/v1/admin/desktops', 'desktops');
    printTable(r.pools as { id: string; name: string; policy: Json }[], [
      { h: 'name', v: (p) => p.name }, { h: 'desktops', v: (p) => ds.filter((d) => d.poolId === p.id).length, right: true },
      { h: 'policy', v: (p) => Object.entries(p.policy).map(([k, v]) => `${k}=${String(v)}`).join(' ') }, { h: 'id', v: (p) => p.id },
    ]);
  } });
  endpoint(pools, { name: 'add <name>', description: 'create a pool', method: 'POST', path: () => '/v1/admin/pools', body: ([name]) => ({ name }), human: (r, [n]) => say(`pool ${n!} (${String(r.id)})`) });
  endpoint(pools, { name: 'delete <pool>', description: 'delete an empty pool (and the entitlements to it)', method: 'DELETE', path: ([p]) => `/v1/admin/pools/${enc(p!)}`, human: (_r, [p]) => say(`deleted pool ${p!}`) });
}
