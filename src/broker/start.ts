import { join } from 'node:path';
import Fastify, { type FastifyInstance } from 'fastify';
import { closePromptly } from '../net/close-server.js';
import { encodeLineageKeys, unwrapLineageKeys } from '../core/keys.js';
import { NoHypervisor, QmpHypervisor, type DatacenterHypervisor } from '../hypervisor/datacenter/hypervisor.js';
import { loadOrCreateTls } from '../net/tls-cert.js';
import { openChunkStore } from '../store/open-store.js';
import { defaultS3IndexPath } from '../store/s3-chunk-store.js';
import { auditChainKey } from './db/audit-chain.js';
import { openMetadata } from './db/open.js';
import { checkLdapConfig } from './auth/directory.js';
import { DatabaseFailureLog, DEFAULT_THROTTLE, LoginThrottle, type ThrottleSettings } from './auth/throttle.js';
import { transferServerSync } from './auth/trust.js';
import { startTransferServer, type TransferServer } from '../transfer/server.js';
import type { BrokerContext, BrokerSettings } from './context.js';
import { installHttpBasics } from './http.js';
import { ImportJobs } from './desktops/imports.js';
import { consoleRoutes } from './routes/console.js';
import { JobProgress } from './transfers/progress.js';
import { readToken } from './auth/tokens.js';
import { hashPassword } from './auth/passwords.js';
import { adminRoutes } from './routes/admin/admin.js';
import { adminTrustRoutes } from './routes/admin/admin-trust.js';
import { jobRoutes } from './routes/user/jobs.js';
import { agentRoutes } from './routes/agent/agent.js';
import { agentScope } from './routes/agent/agent-scope.js';
import { maintenanceRoutes } from './routes/admin/maintenance.js';
import { transferAdminRoutes, transferRoutes } from './routes/transfers.js';
import { adminScope, guardAdminRoutes } from './routes/admin/admin-scope.js';
import { auditRoutes } from './routes/audit.js';
import { directoryExtraRoutes } from './routes/admin/directory-extra.js';
import { restoreRoutes } from './routes/user/restore.js';
import { uploadRoutes } from './routes/uploads.js';
import { exportRoutes } from './routes/admin/export.js';
import { userScope } from './routes/user/user-scope.js';
import { deviceRoutes } from './routes/user/devices.js';
import { desktopCheckoutRoutes, desktopRoutes } from './routes/user/desktops.js';
import { checkoutRoutes } from './routes/user/checkouts.js';
import { checkInRoutes } from './routes/user/check-ins.js';
import { holderScope } from './routes/user/holder-scope.js';
import { desktopScope } from './routes/user/desktop-scope.js';
import { desktopPowerRoutes } from './routes/user/power.js';
import { openRoutes } from './routes/open.js';
import { guardScopedRoutes, scopeOf, type RouteScope } from './routes/scopes.js';
import { loadOrCreateSecrets } from './secrets.js';
import { Scheduler } from './transfers/scheduler.js';
import { pushRevocations } from './transfers/revoke-push.js';
import { SchedulerStore } from './transfers/scheduler-store.js';
import { HostStore } from './hosts/store.js';
import { hostAdminRoutes, hostRoutes } from './routes/hosts.js';
import { ReleaseStore } from './releases/store.js';
import { releaseAdminRoutes, releaseAgentRoutes } from './routes/releases.js';
import { parseReleasePublicKey } from '../core/tokens/release.js';
import { publicKeyToBase64 } from '../core/signing.js';
import { displayAdminRoutes, displayBrowserRoutes, displayHostRoutes, displayTicketRoutes } from './routes/display.js';
import { displayRelay } from './display/relay.js';
import websocket from '@fastify/websocket';
import { sweepHosts } from './hosts/power.js';
import { randomBytes } from 'node:crypto';
import { hostname } from 'node:os';
import { readFile, realpath, writeFile } from 'node:fs/promises';
import { CarryonError } from '../core/errors.js';
import { parseGateway } from './gateway/routes.js';

export interface BrokerConfig {
  dataDir: string;
  /**
   * Metadata database: a `postgres://user@host/db` URL (several brokers may share it), or absent
   * for SQLite in `<dataDir>/metadata.db`. With PostgreSQL an S3 chunk store's pack index lives
   * there too.
   */
  database?: string;
  /** Chunk store: a directory (default `<dataDir>/chunks`, pack store) or an `s3://bucket/prefix?endpoint=…` URL. */
  chunkStore?: string;
  /** Pack writers and last-use slack of the chunk store (tests set the slack to 0). */
  chunkStoreOptions?: { writers?: number; touchSlackMs?: number };
  host?: string;
  port?: number;
  certFile?: string;
  keyFile?: string;
  /** Slots of the in-process transfer server; 0 = none (standalone transfer servers only). */
  embeddedTransferSlots?: number;
  /** Its port (default: any free one); behind a gateway a fixed one keeps the gateway's config current across restarts. */
  embeddedTransferPort?: number;
  /**
   * Its id in the scheduler: `embedded`, or on PostgreSQL `embedded@<host>:<port>` (brokers
   * sharing a database register theirs side by side).
   */
  embeddedTransferId?: string;
  hypervisor?: { kind: 'none' } | { kind: 'qmp'; socketDir: string };
  settings?: Partial<BrokerSettings>;
  /** First admin, created when the directory has no users. */
  initAdmin?: { name: string; password: string };
  ticketTtlSec?: number;
  pauseGraceSec?: number;
  /** Directories images may be imported from (see BrokerSettings.importDirs). */
  importDirs?: string[];
  throttle?: Partial<ThrottleSettings>;
  /**
   * The public gateway laptops dial (`host:port`) and the domain of the SNI names behind it; set,
   * laptops are handed gateway routes instead of the servers' own URLs. Validated at start.
   */
  gateway?: { address: string; domain?: string; brokerBackend?: string };
  log?: boolean;
  /** The release public key (base64 SPKI, `carryon admin releases keygen`): what published bundles must be signed by. */
  releasePublicKey?: string;
}

export interface RunningBroker {
  url: string;
  fingerprint: string;
  signingPublicKey: string;
  ctx: BrokerContext;
  transfer: TransferServer | null;
  /** Every route it answers (method, path as registered, scope): what the scope tests walk. */
  routes: readonly { method: string; url: string; scope: RouteScope | undefined }[];
  close(): Promise<void>;
}

/** A shared secret in the data dir (`transfer.secret`), made at first start. Desktop hosts each have their own credential (hosts/credentials.ts). */
async function dataDirSecret(dataDir: string, file: string, given?: string): Promise<string> {
  if (given) return given;
  const path = join(dataDir, file);
  try {
    return (await readFile(path, 'utf8')).trim();
  } catch {
    const s = randomBytes(24).toString('base64url');
    await writeFile(path, `${s}\n`, { mode: 0o600 });
    return s;
  }
}

async function resolveImportDirs(dirs: string[]): Promise<string[]> {
  const out: string[] = [];
  for (const d of dirs) {
    try {
      out.push(await realpath(d));
    } catch (err) {
      throw new CarryonError('bad-config', `import directory ${d} cannot be used: ${(err as Error).message}`);
    }
  }
  return out;
}

/** Starts the broker (HTTPS), and by default one transfer server in-process, registered like any other. */
export async function startBroker(config: BrokerConfig): Promise<RunningBroker> {
  if (config.settings?.ldap) checkLdapConfig(config.settings.ldap);
  const secrets = await loadOrCreateSecrets(config.dataDir);
  const tls = await loadOrCreateTls({ dir: config.dataDir, certFile: config.certFile, keyFile: config.keyFile });
  const { meta, sql } = await openMetadata({ dataDir: config.dataDir, database: config.database, auditKey: auditChainKey(secrets.masterKey) });
  const store = await openChunkStore(config.chunkStore ?? join(config.dataDir, 'chunks'), undefined, { ...config.chunkStoreOptions, s3IndexPath: config.database ?? defaultS3IndexPath(config.dataDir) });
  const settings: BrokerSettings = {
    sessionTtlSec: 3600,
    hypervisorOverheadMiB: 256,
    passwordCostN: 1 << 15,
    reauthWindowSec: 900,
    ...config.settings,
    importDirs: await resolveImportDirs(config.importDirs ?? config.settings?.importDirs ?? []),
    transferSecret: await dataDirSecret(config.dataDir, 'transfer.secret', config.settings?.transferSecret),
    ...(config.gateway ? { gateway: parseGateway(config.gateway.address, config.gateway.domain, config.gateway.brokerBackend) } : {}),
  };
  const hypervisor: DatacenterHypervisor = config.hypervisor?.kind === 'qmp' ? new QmpHypervisor(config.hypervisor.socketDir) : new NoHypervisor();
  let transfer: TransferServer | null = null;
  // Transfer servers learn revocations the moment a job ends: the embedded one in process,
  // standalone ones by a signed push (else at their next heartbeat).
  const scheduler: Scheduler = new Scheduler(await SchedulerStore.open(sql), {
    signingKey: secrets.signing.privateKey, ticketTtlSec: config.ticketTtlSec, pauseGraceSec: config.pauseGraceSec, gateway: () => settings.gateway,
    onJobsEnded: async () => {
      const ids = await scheduler.revokedJobIds();
      transfer?.setRevoked(ids);
      const others = (await scheduler.liveServers()).filter((s) => s.id !== transfer?.id);
      if (others.length) await pushRevocations(others, ids, secrets.signing.privateKey);
    },
  });
  /** Desktop imports running in the background (admin and upload routes start them). */
  const imports = new ImportJobs();
  const releaseKey = config.releasePublicKey ? parseReleasePublicKey(config.releasePublicKey, 'the release key') : null;
  const releases = { store: await ReleaseStore.open(sql), key: releaseKey, keyB64: releaseKey ? publicKeyToBase64(releaseKey) : null, dir: join(config.dataDir, 'releases') };
  const ctx: BrokerContext = {
    settings, self: { url: '', fingerprint: tls.fingerprint }, meta, store, secrets, scheduler, hypervisor, hosts: await HostStore.open(sql), releases, jobProgress: new JobProgress(),
    throttle: new LoginThrottle(new DatabaseFailureLog(meta), { ...DEFAULT_THROTTLE, ...config.throttle }),
    audit: async (e) => void (await meta.addEvent({ actor: e.actor, desktopId: e.desktopId ?? null, action: e.action, outcome: e.outcome, detail: e.detail ?? null })),
    keysFor: (wrapped, context) => encodeLineageKeys(unwrapLineageKeys(secrets.masterKey, wrapped, context)),
  };
  if (config.initAdmin && (await meta.listUsers()).length === 0) {
    await meta.createUser({ name: config.initAdmin.name, passwordHash: await hashPassword(config.initAdmin.password, { N: settings.passwordCostN }), role: 'admin' });
    await ctx.audit({ actor: 'system', action: 'user-create', outcome: 'ok', detail: `initial admin ${config.initAdmin.name}` });
  }

  const app = Fastify({ https: { cert: tls.cert, key: tls.key }, bodyLimit: 32 * 1024 * 1024, logger: config.log ?? false });
  await installHttpBasics(app, (req, status, code, message) => {
    // Refusals the route did not audit itself (malformed or oversize bodies, invalid fields, …).
    const auth = req.headers.authorization ?? '';
    const actor = (auth.startsWith('Bearer ') ? readToken(ctx.secrets.tokenKey, auth.slice(7))?.sub : undefined) ?? `anonymous@${req.ip}`;
    return ctx.audit({ actor, action: 'request', outcome: 'denied', detail: `${req.method} ${req.url.split('?')[0]}: ${status} ${code}: ${message.slice(0, 200)}` });
  });
  const routes: { method: string; url: string; scope: RouteScope | undefined }[] = [];
  app.addHook('onRoute', function (this: FastifyInstance, r) {
    routes.push(...[r.method].flat().map((method) => ({ method, url: r.url, scope: scopeOf(this) })));
  });
  guardAdminRoutes(app);
  guardScopedRoutes(app);
  // The display relay's WebSockets (small frames: VNC; a browser's messages are bounded too).
  await app.register(websocket, { options: { maxPayload: 4 * 1024 * 1024, perMessageDeflate: false } });
  // One plugin per resource, each encapsulated: a hook or parser one adds reaches no other. Every
  // /v1 route is in a scope (routes/scopes.ts; one in none fails the start).
  // Reachable without a session, on purpose: login, the broker's keys, the display's ticketed socket.
  await app.register(openRoutes, { ctx });
  await app.register(displayBrowserRoutes, { ctx });
  // Every user route, behind one session check (its onRequest hook).
  await app.register(userScope, {
    ctx,
    resources: async (user) => {
      await user.register(deviceRoutes, { ctx });
      await user.register(desktopRoutes, { ctx });
      // Routes that name a check-out, behind one holder check (its onRequest hook).
      await user.register(holderScope, {
        ctx,
        resources: async (held) => {
          await held.register(checkoutRoutes, { ctx });
          await held.register(checkInRoutes, { ctx });
        },
      });
      // Routes that name a desktop, behind one entitlement check (its onRequest hook).
      await user.register(desktopScope, {
        ctx,
        resources: async (entitled) => {
          await entitled.register(desktopCheckoutRoutes, { ctx });
          await entitled.register(restoreRoutes, { ctx });
          await entitled.register(desktopPowerRoutes, { ctx });
          await entitled.register(displayTicketRoutes, { ctx });
        },
      });
      await user.register(jobRoutes, { ctx });
    },
  });
  // Every agent route, behind one device-signature check (its preHandler hook: the signature covers the body).
  await app.register(agentScope, {
    ctx,
    resources: async (agent) => {
      await agent.register(agentRoutes, { ctx });
      await agent.register(releaseAgentRoutes, { ctx });
    },
  });
  // The machines': each plugin checks its secret in its own onRequest hook.
  await app.register(transferRoutes, { ctx });
  await app.register(hostRoutes, { ctx });
  await app.register(displayHostRoutes, { ctx });
  // Every /v1/admin route, behind one admin check (a /v1/admin route outside it fails the start).
  await app.register(adminScope, {
    ctx,
    resources: async (admin) => {
      await admin.register(adminRoutes, { ctx, imports });
      await admin.register(adminTrustRoutes, { ctx });
      await admin.register(directoryExtraRoutes, { ctx });
      await admin.register(auditRoutes, { ctx });
      await admin.register(uploadRoutes, { ctx, dir: join(config.dataDir, 'uploads'), imports });
      await admin.register(maintenanceRoutes, { ctx });
      await admin.register(transferAdminRoutes, { ctx });
      await admin.register(exportRoutes, { ctx });
      await admin.register(hostAdminRoutes, { ctx });
      await admin.register(displayAdminRoutes, { ctx });
      await admin.register(releaseAdminRoutes, { ctx });
    },
  });
  // The console's pages only: its API is the resources' above.
  await app.register(consoleRoutes, {});
  const host = config.host ?? '127.0.0.1';
  if (settings.gateway && !settings.gateway.brokerBackend && (host === '0.0.0.0' || host === '::')) {
    throw new CarryonError('bad-config', `the broker listens on every address (${host}): add --gateway-backend HOST:PORT, the address the gateway reaches it at`);
  }
  await app.listen({ host, port: config.port ?? 0 });
  const addr = app.server.address();
  const url = `https://${host.includes(':') ? `[${host}]` : host}:${typeof addr === 'object' && addr ? addr.port : config.port}`;
  ctx.self.url = url;

  // Hosts silent for three heartbeats are marked (and their desktops) even when nobody looks; CAS in the database, so brokers sharing it audit each once.
  let sweeping: Promise<void> | null = null;
  const hostSweep = setInterval(() => {
    sweeping ??= sweepHosts(ctx).catch((err: Error) => void process.stderr.write(`carryon: host sweep failed: ${err.message}\n`)).finally(() => (sweeping = null));
  }, 2000);
  hostSweep.unref();
  let beat: NodeJS.Timeout | null = null;
  let syncing: Promise<void> | null = null;
  const slots = config.embeddedTransferSlots ?? 4;
  if (slots > 0) {
    const id = config.embeddedTransferId ?? (config.database ? `embedded@${hostname()}:${new URL(url).port}` : 'embedded');
    transfer = await startTransferServer({ id, host, port: config.embeddedTransferPort, slots, store, masterKey: secrets.masterKey, brokerPublicKey: secrets.signing.publicKey, tlsDir: join(config.dataDir, 'transfer-tls') });
    const t = transfer;
    await scheduler.registerServer({ id: t.id, url: t.url, fingerprint: t.fingerprint, slots });
    let ticks = 0;
    t.setRevoked(await scheduler.revokedJobIds());
    // Per-job progress every second (in memory, for live admin views); the scheduler, the access
    // summaries of evicted jobs (audit) and the revocation list every 5 s.
    beat = setInterval(() => {
      ctx.jobProgress.report(t.id, t.stats.perJob);
      if (++ticks % 5 === 0 && !syncing) {
        syncing = (async () => {
          await scheduler.serverHeartbeat(t.id, { bytesIn: t.stats.bytesIn, bytesOut: t.stats.bytesOut });
          t.setRevoked(await transferServerSync(ctx, t.id, t.drainSummaries()));
        })().catch((err: Error) => void process.stderr.write(`carryon: transfer server heartbeat failed: ${err.message}\n`)).finally(() => (syncing = null));
      }
    }, 1000);
    beat.unref();
  }
  return {
    url,
    fingerprint: tls.fingerprint,
    signingPublicKey: secrets.signing.publicKey.export({ format: 'der', type: 'spki' }).toString('base64'),
    routes,
    ctx,
    transfer,
    close: async () => {
      if (beat) clearInterval(beat);
      clearInterval(hostSweep);
      await Promise.all([syncing, sweeping]);
      // Open displays end (audited, both sockets closed) while the database is still there.
      await displayRelay(ctx).closeAll();
      // Per-job summaries still held by the embedded server go to the audit trail before closing.
      if (transfer) await transferServerSync(ctx, transfer.id, (transfer.sweep(), transfer.drainSummaries()));
      await Promise.all([transfer?.close(), closePromptly(app)]);
      if (transfer) await scheduler.retireServer(transfer.id).catch(() => undefined);
      await store.close();
      await sql.close();
    },
  };
}
