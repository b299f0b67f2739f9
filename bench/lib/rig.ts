import { NODE_FLAGS } from '../../src/core/runtime/node-flags.js';
import { spawn, type ChildProcess } from 'node:child_process';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { request, type Agent } from 'undici';
import { startBroker, type RunningBroker } from '../../src/broker/start.js';
import { defaultS3IndexPath } from '../../src/store/s3-chunk-store.js';
import { enroll, type ClientEnv } from '../../src/client/ops.js';
import { pinnedAgent } from '../../src/net/pinned-agent.js';
import { processCpuSeconds } from './measure.js';

const HEARTBEAT_SEC = 1;
const CLI = fileURLToPath(new URL('../../src/cli/carryon.cjs', import.meta.url));

/**
 * A broker on 127.0.0.1 with one user and one desktop, and its transfer server in a process of
 * its own (`carryon transfer-server` on the broker's store), as in a deployment: the laptop's
 * work and the server's do not share one event loop, just as rsync's sender and receiver don't.
 */
export class Rig {
  private laptops = 0;
  private constructor(
    readonly dir: string,
    readonly broker: RunningBroker,
    private readonly transfers: ChildProcess[],
    private readonly agent: Agent,
    private readonly token: string,
    private readonly slots: number,
    private readonly store: string,
  ) {}

  /**
   * `desktops` > 1: clones `desk-1` … of `desk` (the same chunks), one per laptop that checks out
   * at the same time. `slots`: of each transfer server.
   */
  static async start(dir: string, image: string, chunkSize?: number, opts: RigOptions = {}): Promise<Rig> {
    process.env.CARRYON_SCRYPT_N ??= '16384'; // the laptop's in-process vault KDF only: the broker hashes passwords at its production cost
    process.env.CARRYON_INSECURE_TEST_KDF ??= '1'; // a lowered cost is refused outside tests
    const dataDir = join(dir, 'server');
    const broker = await startBroker({ dataDir, database: opts.database, chunkStore: opts.chunkStore, gateway: opts.gateway, embeddedTransferSlots: 0, initAdmin: { name: 'admin', password: 'bench-admin-pw' }, importDirs: [dirname(image)] });
    const slots = opts.slots ?? 4;
    const transfer = await startTransfer(dir, broker, 'bench-transfer', slots, storeFor(dataDir, opts));
    const agent = pinnedAgent(broker.fingerprint);
    const call = async (path: string, body: unknown, token?: string) => {
      const res = await request(`${broker.url}${path}`, { method: 'POST', dispatcher: agent, headers: { 'content-type': 'application/json', ...(token ? { authorization: `Bearer ${token}` } : {}) }, body: JSON.stringify(body) });
      const json = (await res.body.json()) as Record<string, unknown>;
      if (res.statusCode >= 400) throw new Error(`${path}: ${JSON.stringify(json)}`);
      return json;
    };
    const token = String((await call('/v1/auth/login', { username: 'admin', password: 'bench-admin-pw' })).token);
    await call('/v1/admin/users', { name: 'bench', password: 'bench-user-pw' }, token);
    await call('/v1/admin/desktops', { name: 'desk', image, chunkSize, config: { vcpus: 1, ramMiB: 512, minRamMiB: 256 } }, token);
    await call('/v1/admin/entitlements', { principalType: 'user', principal: 'bench', targetType: 'desktop', target: 'desk' }, token);
    for (let i = 1; i < (opts.desktops ?? 1); i++) {
      await call('/v1/admin/desktops', { name: `desk-${i}`, cloneOf: 'desk' }, token);
      await call('/v1/admin/entitlements', { principalType: 'user', principal: 'bench', targetType: 'desktop', target: `desk-${i}` }, token);
    }
    return new Rig(dir, broker, [transfer], agent, token, slots, storeFor(dataDir, opts));
  }

  /** CPU seconds (user + system, all threads) the transfer server processes have used so far. */
  transferCpuSeconds(): number {
    return this.transfers.reduce((n, t) => n + processCpuSeconds(t.pid!), 0);
  }

  /** Another transfer server (a process of its own) on the same store, registered with the broker. */
  async addTransferServer(): Promise<void> {
    this.transfers.push(await startTransfer(this.dir, this.broker, `bench-transfer-${this.transfers.length + 1}`, this.slots, this.store));
  }

  /** A freshly enrolled laptop with an empty vault; `url`: where it reaches the broker (a gateway), else the broker's own. */
  async laptop(url = this.broker.url): Promise<ClientEnv> {
    const env: ClientEnv = { home: join(this.dir, `laptop-${this.laptops++}`), user: 'bench', password: async () => 'bench-user-pw', log: () => undefined, pollMs: 50 };
    await enroll(env, url, { fingerprint: this.broker.fingerprint, name: 'bench-laptop' });
    return env;
  }

  /** haproxy's config for the broker's gateway (`carryon admin gateway-config`'s API). */
  async gatewayConfig(opts: { bind: string; statsSocket?: string }): Promise<string> {
    const res = await request(`${this.broker.url}/v1/admin/gateway/config`, { method: 'POST', dispatcher: this.agent, headers: { 'content-type': 'application/json', authorization: `Bearer ${this.token}` }, body: JSON.stringify(opts) });
    const body = (await res.body.json()) as { config?: string };
    if (res.statusCode !== 200 || !body.config) throw new Error(`gateway config: ${JSON.stringify(body)}`);
    return body.config;
  }

  /**
   * The transfer server's byte counters as its latest heartbeat told the broker (waits one
   * heartbeat first, so what just happened is counted). Not part of any timed step.
   */
  async wire(): Promise<{ bytesIn: number; bytesOut: number }> {
    await new Promise((r) => setTimeout(r, HEARTBEAT_SEC * 1000 + 400));
    const res = await request(`${this.broker.url}/v1/admin/transfers`, { dispatcher: this.agent, headers: { authorization: `Bearer ${this.token}` } });
    const body = (await res.body.json()) as { servers: { id: string; bytesIn: number; bytesOut: number }[] };
    const ours = body.servers.filter((x) => x.id.startsWith('bench-transfer'));
    if (ours.length !== this.transfers.length) throw new Error('a bench transfer server is not registered');
    return { bytesIn: ours.reduce((n, s) => n + s.bytesIn, 0), bytesOut: ours.reduce((n, s) => n + s.bytesOut, 0) };
  }

  async close(): Promise<void> {
    for (const t of this.transfers) {
      const exited = new Promise((r) => t.once('exit', r));
      t.kill('SIGTERM');
      await exited;
    }
    await this.agent.close();
    await this.broker.close();
  }
}

export interface RigOptions {
  desktops?: number;
  slots?: number;
  /** The broker's metadata on PostgreSQL (a postgres:// URL); SQLite in its data directory otherwise. */
  database?: string;
  /** The chunk store (an s3:// URL); the broker's local pack store otherwise. */
  chunkStore?: string;
  /** The broker's public gateway (`--gateway`, `--gateway-domain`). */
  gateway?: { address: string; domain: string };
}

/** What a transfer server opens to share the broker's store: the pack directory, or the S3 URL with the broker's pack index. */
function storeFor(dataDir: string, opts: RigOptions): string {
  if (!opts.chunkStore) return join(dataDir, 'chunks');
  const index = opts.database ?? defaultS3IndexPath(dataDir);
  return `${opts.chunkStore}${opts.chunkStore.includes('?') ? '&' : '?'}index=${encodeURIComponent(index)}`;
}

/** `carryon transfer-server` in a process of its own on the broker's store; resolves once it has registered. */
async function startTransfer(dir: string, broker: RunningBroker, id: string, slots: number, store: string): Promise<ChildProcess> {
  const dataDir = join(dir, 'server');
  // TRANSFER_CPU_PROF=DIR: each transfer server writes a V8 CPU profile there when it stops (profiling runs only).
  const prof = process.env.TRANSFER_CPU_PROF ? ['--cpu-prof', `--cpu-prof-dir=${process.env.TRANSFER_CPU_PROF}`] : [];
  const transfer = spawn(process.execPath, [...NODE_FLAGS, ...prof, CLI, 'transfer-server', '--broker', broker.url, '--broker-fingerprint', broker.fingerprint,
    '--secret-file', join(dataDir, 'transfer.secret'), '--master-key-file', join(dataDir, 'master.key'), '--store', store,
    '--id', id, '--slots', String(slots), '--port', '0', '--tls-dir', join(dir, `${id}-tls`), '--heartbeat-sec', String(HEARTBEAT_SEC)], { stdio: ['ignore', 'pipe', 'pipe'] });
  await new Promise<void>((resolve, reject) => {
    let out = '';
    const t = setTimeout(() => reject(new Error(`transfer server did not start: ${out}`)), 30_000);
    const on = (d: Buffer) => {
      out += d.toString();
      if (/registered with/.test(out)) { clearTimeout(t); resolve(); }
    };
    transfer.stdout!.on('data', on);
    transfer.stderr!.on('data', on);
    transfer.once('exit', (code) => { clearTimeout(t); reject(new Error(`transfer server exited (${code}): ${out}`)); });
  });
  return transfer;
}
