import { readFileSync } from 'node:fs';
import { homedir } from 'node:os';
import { join } from 'node:path';
import type { Command } from 'commander';
import { z } from 'zod';
import { CarryonError } from '../core/errors.js';
import { OUT_OF_DATE, parseGateway } from '../broker/gateway/routes.js';
import { registerAdminCommands } from './admin/admin-commands.js';
import { registerAdminTrustCommands } from './admin/admin-trust-commands.js';
import { registerMaintenanceCommands } from './admin/maintenance-commands.js';
import { passwordSource } from './common.js';

const ServerConfigFile = z.object({
  dataDir: z.string().optional(),
  /** postgres://… (several brokers may share it); absent: SQLite in the data directory. */
  database: z.string().optional(),
  chunkStore: z.string().optional(),
  host: z.string().optional(),
  port: z.number().int().min(0).max(65535).optional(),
  certFile: z.string().optional(),
  keyFile: z.string().optional(),
  transferSlots: z.number().int().min(0).max(1024).optional(),
  /** The embedded transfer server's port (default: any free one); a gateway's config names it. */
  transferPort: z.number().int().min(0).max(65535).optional(),
  ldap: z.object({ url: z.string(), userDnTemplate: z.string(), groupBase: z.string().optional(), adminGroup: z.string().optional(), startTls: z.boolean().optional(), allowInsecure: z.boolean().optional(), caseSensitiveNames: z.boolean().optional() }).strict().optional(),
  /** Directories `admin desktops create` may import images from. */
  importDirs: z.array(z.string()).optional(),
  hypervisor: z.union([z.object({ kind: z.literal('none') }), z.object({ kind: z.literal('qmp'), socketDir: z.string() })]).optional(),
  /** The public gateway laptops are given (`host:port`) and the domain of the names behind it. */
  gateway: z.object({ address: z.string(), domain: z.string(), brokerBackend: z.string().optional() }).strict().optional(),
}).strict();

function loadConfigFile(path?: string) {
  if (!path) return {};
  let raw: unknown;
  try {
    raw = JSON.parse(readFileSync(path, 'utf8'));
  } catch (err) {
    throw new CarryonError('bad-config', `cannot read config ${path}: ${(err as Error).message}`);
  }
  const parsed = ServerConfigFile.safeParse(raw);
  if (!parsed.success) throw new CarryonError('bad-config', `config ${path}: ${parsed.error.issues.map((i) => `${i.path.join('.')}: ${i.message}`).join('; ')}`);
  return parsed.data;
}

const int = (name: string) => (v: string) => {
  const n = Number(v);
  if (!Number.isInteger(n) || n < 0) throw new CarryonError('invalid', `${name} must be a non-negative integer, got ${v}`);
  return n;
};

export function registerServerCommands(program: Command): void {
  program
    .command('server')
    .description('run the broker (HTTPS) with an embedded transfer server; config: file < environment < flags')
    .option('--config <file>', 'JSON config file')
    .option('--data-dir <dir>', 'data directory (env CARRYON_DATA_DIR)')
    .option('--database <url>', 'metadata database: postgres://user@host:5432/carryon (several brokers may share it; password: PGPASSWORD or ~/.pgpass, or in the URL) (env CARRYON_DATABASE); default: SQLite in the data directory')
    .option('--chunk-store <dir|url>', 'chunk store: a directory (default <data-dir>/chunks) or s3://bucket/prefix?endpoint=URL&region=R (env CARRYON_CHUNK_STORE; credentials: AWS_ACCESS_KEY_ID… or ~/.aws)')
    .option('--host <addr>', 'listen address', undefined)
    .option('--port <n>', 'listen port (env CARRYON_PORT)', int('--port'))
    .option('--cert <file>', 'TLS certificate (PEM); default: self-signed, generated at first start')
    .option('--key <file>', 'TLS private key (PEM)')
    .option('--transfer-slots <n>', 'slots of the embedded transfer server (0: none)', int('--transfer-slots'))
    .option('--transfer-port <n>', 'port of the embedded transfer server (default: any free one; fix it behind a gateway, whose config names it)', int('--transfer-port'))
    .option('--import-dir <dir>', 'a directory images may be imported from (repeatable; none: imports by path are refused)', (v: string, acc: string[] = []) => [...acc, v])
    .option('--init-admin <name>', 'create this first admin if there are no users (password: CARRYON_ADMIN_PASSWORD or prompt)')
    .option('--gateway <host:port>', 'the public gateway (haproxy, `carryon admin gateway-config`) laptops are given instead of the servers\' own addresses')
    .option('--gateway-domain <name>', 'DNS suffix of the names presented to the gateway: broker.NAME, <transfer-id>.transfer.NAME')
    .option('--gateway-backend <host:port>', 'where the gateway reaches this broker (default: --host:--port; needed with --host 0.0.0.0)')
    .action(async (o: { config?: string; dataDir?: string; database?: string; chunkStore?: string; host?: string; port?: number; cert?: string; key?: string; transferSlots?: number; transferPort?: number; initAdmin?: string; importDir?: string[]; gateway?: string; gatewayDomain?: string; gatewayBackend?: string }) => {
      const file = loadConfigFile(o.config);
      const dataDir = o.dataDir ?? process.env.CARRYON_DATA_DIR ?? file.dataDir ?? join(homedir(), '.carryon-server');
      const port = o.port ?? (process.env.CARRYON_PORT ? int('CARRYON_PORT')(process.env.CARRYON_PORT) : undefined) ?? file.port ?? 8443;
      const initAdmin = o.initAdmin ? { name: o.initAdmin, password: await passwordSource({}, 'CARRYON_ADMIN_PASSWORD', `Password for ${o.initAdmin}`)() } : undefined;
      const chunkStore = o.chunkStore ?? process.env.CARRYON_CHUNK_STORE ?? file.chunkStore;
      const database = o.database ?? process.env.CARRYON_DATABASE ?? file.database;
      // Loaded here, not at the top: every other command (a laptop's `carryon status`) would pay for
      // fastify, pg and the S3 SDK at start (≈ 0.7 s of CPU each run).
      const [{ startBroker }, { describeStore }, { checkPostgresUrl, redactDatabaseUrl }, { gatewayStatus }] = await Promise.all([
        import('../broker/start.js'), import('../store/open-store.js'), import('../sql/pg-driver.js'), import('../broker/gateway/state.js'),
      ]);
      if (database) checkPostgresUrl(database); // a clear error before anything starts
      const gatewayAddress = o.gateway ?? file.gateway?.address;
      if (!gatewayAddress && o.gatewayDomain) throw new CarryonError('bad-config', '--gateway-domain needs --gateway HOST:PORT');
      const brokerBackend = o.gatewayBackend ?? file.gateway?.brokerBackend;
      if (!gatewayAddress && brokerBackend) throw new CarryonError('bad-config', '--gateway-backend needs --gateway HOST:PORT');
      const gateway = gatewayAddress ? { address: gatewayAddress, domain: o.gatewayDomain ?? file.gateway?.domain, brokerBackend } : undefined;
      if (gateway) parseGateway(gateway.address, gateway.domain, gateway.brokerBackend); // a clear error before anything starts
      const broker = await startBroker({
        dataDir, database, chunkStore, host: o.host ?? file.host ?? '127.0.0.1', port, certFile: o.cert ?? file.certFile, keyFile: o.key ?? file.keyFile,
        embeddedTransferSlots: o.transferSlots ?? file.transferSlots, embeddedTransferPort: o.transferPort ?? file.transferPort, hypervisor: file.hypervisor, settings: file.ldap ? { ldap: file.ldap } : undefined, initAdmin,
        importDirs: o.importDir ?? file.importDirs ?? [], gateway,
      });
      process.stdout.write(`carryon broker listening on ${broker.url}\ncertificate fingerprint (SHA-256): ${broker.fingerprint}\ndata directory: ${dataDir}\n`);
      process.stdout.write(`metadata: ${database ? `PostgreSQL ${redactDatabaseUrl(database)}` : `SQLite ${join(dataDir, 'metadata.db')}`}\n`);
      const dirs = broker.ctx.settings.importDirs;
      process.stdout.write(dirs.length ? `images may be imported from: ${dirs.join(', ')}\n` : 'no --import-dir: admins cannot import images by path\n');
      if (chunkStore) process.stdout.write(`chunk store: ${describeStore(chunkStore)}\n`);
      if (broker.transfer) process.stdout.write(`embedded transfer server ${broker.transfer.url} (${broker.transfer.slots} slots)\n`);
      const gw = await gatewayStatus(broker.ctx);
      if (gw) process.stdout.write(`laptops are given the gateway ${gw.url} (broker.${gw.domain})${gw.upToDate ? '' : `; ${OUT_OF_DATE}`}\n`);
      await new Promise<void>((resolve) => {
        process.once('SIGINT', resolve);
        process.once('SIGTERM', resolve);
      });
      // A second signal, or a close that hangs anyway, ends the process: a restart must find the port free.
      const force = () => process.exit(1);
      process.once('SIGINT', force);
      process.once('SIGTERM', force);
      setTimeout(() => {
        process.stderr.write('carryon: the broker did not close within 10 s; exiting anyway\n');
        force();
      }, 10_000).unref();
      process.stderr.write('stopping: requests in flight get 2 s, then their connections are closed\n');
      await broker.close();
      process.stderr.write('stopped\n');
      // Nothing left to do: a stray timer or pool handle must not keep the process (and its port) alive.
      process.exit(process.exitCode ?? 0);
    });
  registerAdminCommands(program);
  registerAdminTrustCommands(program);
  registerMaintenanceCommands(program);
}
