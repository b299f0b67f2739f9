import { spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { connect, createServer } from 'node:net';
import { tmpdir, userInfo } from 'node:os';
import { join } from 'node:path';
import { S3ChunkStore, type S3StoreOptions } from '../../src/store/s3-chunk-store.js';
import { parseS3Url } from '../../src/store/s3-config.js';

/**
 * A real S3-compatible server for tests and the bench: OpenStack Swift (Debian's python3-swift)
 * with its s3api middleware, single node, one replica, on 127.0.0.1 only. Account, container,
 * object and proxy servers and a memcached (tempauth keeps its tokens there) each run as a
 * process of our own, in a group of its own, and `stop()` kills every group and removes the
 * temp directory. Starts in a few seconds.
 *
 * Swift's init scripts are never used (they would start daemons on 0.0.0.0): only the library
 * package is installed, and this file writes the configuration and starts the servers itself.
 */
export interface SwiftEndpoint {
  endpoint: string;
  region: string;
  accessKeyId: string;
  secretAccessKey: string;
}

export interface SwiftServer extends SwiftEndpoint {
  stop(): Promise<void>;
  /** For an `exit` handler: kills every server and removes the directory, synchronously. */
  stopNow(): void;
  /** The servers never keep this process alive (a test file ends when its tests do). */
  unref(): void;
}

/** Where Debian's python3-swift lives (the python3 on PATH may be another interpreter). */
export const SWIFT_PYTHON = process.env.CARRYON_SWIFT_PYTHON ?? '/usr/bin/python3';

const LAUNCHER = `
import ctypes, os, sys
# Die with the test process even when it is killed outright (PR_SET_PDEATHSIG = 1, SIGKILL).
ctypes.CDLL(None, use_errno=True).prctl(1, 9)
if sys.argv[1] == 'exec':
    os.execvp(sys.argv[2], sys.argv[2:])
def rings(d, ports):
    from swift.common.ring import RingBuilder
    for name, port in zip(('account', 'container', 'object'), ports):
        b = RingBuilder(6, 1, 1)
        b.add_dev({'id': 0, 'region': 1, 'zone': 1, 'ip': '127.0.0.1', 'port': int(port), 'device': 'd1', 'weight': 100, 'meta': ''})
        b.rebalance()
        b.get_ring().save('%s/%s.ring.gz' % (d, name))
def serve(d, conf, section):
    from swift.common import utils
    utils.set_swift_dir(d)
    from swift.common.wsgi import run_wsgi
    sys.exit(run_wsgi(conf, section, verbose=True))
if sys.argv[1] == 'rings':
    rings(sys.argv[2], sys.argv[3:])
else:
    serve(sys.argv[2], sys.argv[3], sys.argv[4])
`;

export async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = createServer();
    srv.once('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const addr = srv.address();
      srv.close(() => (typeof addr === 'object' && addr ? resolve(addr.port) : reject(new Error('no port'))));
    });
  });
}

function run(cmd: string, args: string[], opts: { cwd?: string } = {}): ChildProcess {
  // detached: a process group of its own, so stop() can kill it and everything it started.
  return spawn(cmd, args, { cwd: opts.cwd, detached: true, stdio: ['ignore', 'pipe', 'pipe'] });
}

function killGroup(p: ChildProcess): Promise<void> {
  if (p.exitCode !== null || p.signalCode !== null || p.pid === undefined) return Promise.resolve();
  const exited = new Promise<void>((r) => p.once('exit', () => r()));
  try {
    process.kill(-p.pid, 'SIGKILL');
  } catch {
    return Promise.resolve(); // already gone
  }
  return exited;
}

async function waitHttp(url: string, deadline: number, procs: { name: string; p: ChildProcess; log: () => string }[]): Promise<void> {
  for (;;) {
    for (const { name, p, log } of procs) {
      if (p.exitCode !== null) throw new Error(`swift ${name} exited (${p.exitCode}):\n${log().slice(-3000)}`);
    }
    try {
      const res = await fetch(url, { signal: AbortSignal.timeout(1000) });
      if (res.ok) return;
    } catch {
      // not up yet
    }
    if (Date.now() > deadline) throw new Error(`swift did not answer ${url} in time:\n${procs.map((x) => `${x.name}: ${x.log().slice(-1500)}`).join('\n')}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

const conf = (d: string, port: number, user: string, body: string) => `[DEFAULT]
bind_ip = 127.0.0.1
bind_port = ${port}
workers = 0
user = ${user}
swift_dir = ${d}
devices = ${d}/srv
mount_check = false
fallocate_reserve = 0
disable_fallocate = true
log_level = WARNING
${body}`;

/** Starts Swift + s3api on free loopback ports; the caller must `stop()` it. */
export async function startSwift(opts: { region?: string } = {}): Promise<SwiftServer> {
  const region = opts.region ?? 'us-east-1';
  const d = mkdtempSync(join(tmpdir(), 'carryon-swift-'));
  const procs: { name: string; p: ChildProcess; log: () => string }[] = [];
  const stop = async () => {
    await Promise.all(procs.map(({ p }) => killGroup(p)));
    rmSync(d, { recursive: true, force: true });
  };
  const stopNow = () => {
    for (const { p } of procs) {
      try {
        if (p.pid !== undefined && p.exitCode === null && p.signalCode === null) process.kill(-p.pid, 'SIGKILL');
      } catch {
        // already gone
      }
    }
    rmSync(d, { recursive: true, force: true });
  };
  const unref = () => {
    for (const { p } of procs) {
      p.unref();
      for (const s of [p.stdout, p.stderr]) (s as { unref?: () => void } | null)?.unref?.();
    }
  };
  try {
    const user = userInfo().username;
    const [pa, pc, po, pp, pm] = [await freePort(), await freePort(), await freePort(), await freePort(), await freePort()];
    mkdirSync(join(d, 'srv', 'd1'), { recursive: true });
    writeFileSync(join(d, 'launch.py'), LAUNCHER);
    writeFileSync(join(d, 'swift.conf'), '[swift-hash]\nswift_hash_path_suffix = carryon-test\nswift_hash_path_prefix = carryon-test\n\n[storage-policy:0]\nname = Policy-0\ndefault = yes\n');
    writeFileSync(join(d, 'account-server.conf'), conf(d, pa, user, '[pipeline:main]\npipeline = account-server\n[app:account-server]\nuse = egg:swift#account\n'));
    writeFileSync(join(d, 'container-server.conf'), conf(d, pc, user, '[pipeline:main]\npipeline = container-server\n[app:container-server]\nuse = egg:swift#container\n'));
    writeFileSync(join(d, 'object-server.conf'), conf(d, po, user, '[pipeline:main]\npipeline = object-server\n[app:object-server]\nuse = egg:swift#object\n'));
    writeFileSync(join(d, 'proxy-server.conf'), conf(d, pp, user, `
[pipeline:main]
pipeline = catch_errors gatekeeper healthcheck proxy-logging cache listing_formats s3api tempauth copy slo dlo proxy-logging proxy-server
[app:proxy-server]
use = egg:swift#proxy
account_autocreate = true
# One node on a loaded test machine: be patient with it, and never "error-limit" it (the proxy
# would then answer 503 for every request for a minute).
conn_timeout = 5
node_timeout = 60
recoverable_node_timeout = 60
error_suppression_interval = 1
error_suppression_limit = 1000000
[filter:catch_errors]
use = egg:swift#catch_errors
[filter:gatekeeper]
use = egg:swift#gatekeeper
[filter:healthcheck]
use = egg:swift#healthcheck
[filter:proxy-logging]
use = egg:swift#proxy_logging
[filter:cache]
use = egg:swift#memcache
memcache_servers = 127.0.0.1:${pm}
[filter:listing_formats]
use = egg:swift#listing_formats
[filter:s3api]
use = egg:swift#s3api
location = ${region}
[filter:tempauth]
use = egg:swift#tempauth
user_carryon_tester = testing .admin
[filter:copy]
use = egg:swift#copy
[filter:slo]
use = egg:swift#slo
[filter:dlo]
use = egg:swift#dlo
`));
    const rings = run(SWIFT_PYTHON, [join(d, 'launch.py'), 'rings', d, String(pa), String(pc), String(po)]);
    let ringLog = '';
    rings.stderr!.on('data', (b: Buffer) => (ringLog += b.toString()));
    const code = await new Promise<number | null>((r) => rings.once('exit', r));
    if (code !== 0) throw new Error(`building Swift rings failed (is python3-swift installed for ${SWIFT_PYTHON}?): ${ringLog.slice(-2000)}`);
    const start = (name: string, cmd: string, args: string[]) => {
      const p = run(cmd, args, { cwd: d });
      let log = '';
      const add = (b: Buffer) => {
        log += b.toString();
        if (log.length > 100_000) log = log.slice(-50_000);
      };
      p.stdout!.on('data', add);
      p.stderr!.on('data', add);
      p.once('error', (err) => add(Buffer.from(String(err))));
      procs.push({ name, p, log: () => log });
    };
    // memcached refuses to run as root unless told which user to be.
    start('memcached', SWIFT_PYTHON, [join(d, 'launch.py'), 'exec', 'memcached', '-l', '127.0.0.1', '-p', String(pm), '-U', '0', '-m', '32', ...(process.getuid?.() === 0 ? ['-u', 'root'] : [])]);
    for (const s of ['account', 'container', 'object', 'proxy']) start(s, SWIFT_PYTHON, [join(d, 'launch.py'), 'serve', d, join(d, `${s}-server.conf`), `${s}-server`]);
    const deadline = Date.now() + 30_000;
    await waitHttp(`http://127.0.0.1:${pp}/healthcheck`, deadline, procs);
    // The proxy is up; the backends must be too before the first PUT (they start in parallel).
    for (const port of [pa, pc, po]) await waitTcp(port, deadline);
    return { endpoint: `http://127.0.0.1:${pp}`, region, accessKeyId: 'carryon:tester', secretAccessKey: 'testing', stop, stopNow, unref };
  } catch (err) {
    await stop();
    throw err;
  }
}

async function waitTcp(port: number, deadline: number): Promise<void> {
  for (;;) {
    const ok = await new Promise<boolean>((r) => {
      const s = connect(port, '127.0.0.1');
      s.once('connect', () => (s.destroy(), r(true)));
      s.once('error', () => r(false));
    });
    if (ok) return;
    if (Date.now() > deadline) throw new Error(`swift backend on port ${port} did not start`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

/** An S3 chunk store in `bucket` (created) of a running Swift, its SQLite pack index under `root`. */
export async function openSwiftStore(swift: SwiftEndpoint, root: string, bucket: string, extra = '', opts: S3StoreOptions & { endpoint?: string } = {}): Promise<S3ChunkStore> {
  const url = `s3://${bucket}/carryon?endpoint=${encodeURIComponent(opts.endpoint ?? swift.endpoint)}&region=${swift.region}&create=true${extra}`;
  const config = { ...parseS3Url(url, { indexPath: join(root, 'index.sqlite') }), credentials: { accessKeyId: swift.accessKeyId, secretAccessKey: swift.secretAccessKey } };
  return S3ChunkStore.open(config, opts);
}

let own: Promise<SwiftServer> | null = null;

/**
 * The Swift server for this test process: the one `scripts/run-tests.mjs` started for an S3 pass
 * (CARRYON_TEST_S3_*), or one of its own, started on first use and stopped when the process exits.
 */
export async function testSwift(): Promise<SwiftEndpoint> {
  const e = process.env;
  if (e.CARRYON_TEST_S3_ENDPOINT) {
    return { endpoint: e.CARRYON_TEST_S3_ENDPOINT, region: e.CARRYON_TEST_S3_REGION ?? 'us-east-1', accessKeyId: e.CARRYON_TEST_S3_ACCESS_KEY_ID ?? '', secretAccessKey: e.CARRYON_TEST_S3_SECRET_ACCESS_KEY ?? '' };
  }
  own ??= startSwift().then((s) => {
    s.unref();
    process.once('exit', () => s.stopNow());
    return s;
  });
  return own;
}

/** True when this run puts the brokers' chunks on S3 (`CARRYON_TEST_STORE=s3`, the PostgreSQL pass). */
export function testOnS3(): boolean {
  return process.env.CARRYON_TEST_STORE === 's3';
}

/** A bucket name no other test has used. */
export function freshBucket(): string {
  return `carryon-${randomBytes(6).toString('hex')}`;
}

/**
 * The `s3://` URL of a new bucket on `swift` (created at first open), with the credentials put
 * where a broker's S3 client finds them: the environment, never the URL.
 */
export function swiftStoreUrl(swift: SwiftEndpoint, bucket = freshBucket(), prefix = 'carryon'): string {
  Object.assign(process.env, { AWS_ACCESS_KEY_ID: swift.accessKeyId, AWS_SECRET_ACCESS_KEY: swift.secretAccessKey, AWS_REGION: swift.region });
  return `s3://${bucket}/${prefix}?endpoint=${encodeURIComponent(swift.endpoint)}&region=${swift.region}&create=true`;
}

/** For a broker the tests start: a fresh bucket on the run's Swift in an S3 run, else undefined (local packs in its directory). */
export async function testChunkStore(): Promise<string | undefined> {
  return testOnS3() ? swiftStoreUrl(await testSwift()) : undefined;
}
