import { spawn, type ChildProcess } from 'node:child_process';
import { chmod, rm } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { CarryonError } from '../core/errors.js';
import { QmpConnection, QmpError } from '../qemu/qmp.js';
import { ensurePrivateDir } from '../net/private-dir.js';
import { chainBlockdev, type ChainSpec } from './chain.js';
import { missingTool, qemuFailure } from '../qemu/qemu-tools.js';

/** One thing QEMU's block layer can host: a storage daemon, or the VM's own QEMU. Both speak QMP. */
export interface BlockHost {
  readonly qmp: QmpConnection;
}

/**
 * Adds the secret objects (over the private QMP socket, never argv) and the chain's nodes:
 * `baseSecret` (one secret per layer) goes to `spec.baseSecretId`.
 */
export async function addChain(host: BlockHost, spec: ChainSpec, secret: string, baseSecret?: string): Promise<void> {
  if (baseSecret !== undefined) {
    if (!spec.baseSecretId) throw new Error('a base secret needs the spec to name its secret object (baseSecretId)');
    await host.qmp.execute('object-add', { 'qom-type': 'secret', id: spec.baseSecretId, data: baseSecret, format: 'raw' });
  }
  await addLayer(host, chainBlockdev(spec), spec.secretId, secret);
}

/** Adds a secret and one node description (a whole chain, or a layer alone). */
export async function addLayer(host: BlockHost, blockdev: Record<string, unknown>, secretId: string, secret: string): Promise<void> {
  await host.qmp.execute('object-add', { 'qom-type': 'secret', id: secretId, data: secret, format: 'raw' });
  try {
    await host.qmp.execute('blockdev-add', blockdev);
  } catch (err) {
    const known = err instanceof QmpError ? qemuFailure(err.desc) : null;
    if (known) throw new CarryonError(known.code, `${known.message} (QEMU: ${(err as QmpError).desc})`);
    throw err;
  }
}

/**
 * qemu-storage-daemon holding a desktop's chains: exports them over NBD on a 0600 unix socket
 * (`carryon serve`), or runs the jobs that fill or read them (check-out, check-in). Monitor and
 * sockets live in a private 0700 directory.
 */
export class StorageDaemon implements BlockHost {
  private readonly sockets: string[] = [];

  private constructor(
    private readonly child: ChildProcess,
    readonly qmp: QmpConnection,
    readonly runDir: string,
    private readonly exited: Promise<number>,
    private stderr: () => string,
  ) {}

  static async start(runDir: string): Promise<StorageDaemon> {
    await ensurePrivateDir(runDir);
    const qmpPath = join(runDir, 'qsd-qmp.sock');
    await rm(qmpPath, { force: true });
    // setpriv --pdeathsig: a client killed with -9 takes its daemon along (else it would keep the disk locked).
    const qsdArgs = ['--chardev', `socket,id=qmp0,path=${qmpPath},server=on,wait=off`, '--monitor', 'chardev=qmp0'];
    const child = spawn('setpriv', ['--pdeathsig', 'SIGKILL', '--', 'qemu-storage-daemon', ...qsdArgs], { stdio: ['ignore', 'ignore', 'pipe'], env: daemonEnv(process.env) });
    let stderr = '';
    child.stderr?.setEncoding('utf8').on('data', (d: string) => (stderr = (stderr + d).slice(-4000)));
    const exited = new Promise<number>((resolve) => {
      child.once('exit', (code, sig) => resolve(code ?? (sig ? 128 : 1)));
      child.once('error', () => resolve(127));
    });
    let spawnErr: NodeJS.ErrnoException | null = null;
    child.once('error', (e: NodeJS.ErrnoException) => (spawnErr = e));
    let qmp: QmpConnection | undefined;
    for (let i = 0; i < 200 && !qmp; i++) {
      if (spawnErr) throw (spawnErr as NodeJS.ErrnoException).code === 'ENOENT' ? missingTool('setpriv (util-linux)') : spawnErr;
      if (child.exitCode !== null) throw /No such file|not found/i.test(stderr) ? missingTool('qemu-storage-daemon') : new CarryonError('qemu-failed', `qemu-storage-daemon exited at start: ${stderr.trim()}`);
      qmp = await QmpConnection.open(qmpPath).catch(() => undefined);
      if (!qmp) await new Promise((r) => setTimeout(r, 25));
    }
    if (!qmp) {
      child.kill('SIGKILL');
      throw new CarryonError('qemu-failed', 'qemu-storage-daemon did not open its monitor within 5 s');
    }
    return new StorageDaemon(child, qmp, runDir, exited, () => stderr);
  }

  /** Resolves with the daemon's exit code when it ends (asked to or not). */
  get ended(): Promise<number> {
    return this.exited;
  }

  get pid(): number {
    return this.child.pid ?? -1;
  }

  /** Starts the NBD server on `socketPath` (0600) and exports each node under its name. */
  async exportNbd(socketPath: string, exports: { node: string; name: string; writable: boolean }[]): Promise<void> {
    // QEMU creates the socket with its umask: inside a 0700 directory of ours it is private at once.
    await ensurePrivateDir(dirname(socketPath));
    await rm(socketPath, { force: true });
    this.sockets.push(socketPath);
    // nbd-server-start takes the legacy socket address form (data wrapper).
    await this.qmp.execute('nbd-server-start', { addr: { type: 'unix', data: { path: socketPath } } });
    await chmod(socketPath, 0o600);
    for (const e of exports) {
      await this.qmp.execute('block-export-add', { type: 'nbd', id: `exp-${e.name}`, 'node-name': e.node, name: e.name, writable: e.writable, 'allocation-depth': true });
    }
  }

  /** Quits cleanly (flushing every node); kills after `graceMs`. */
  async stop(graceMs = 30_000): Promise<void> {
    if (this.child.exitCode === null) {
      await this.qmp.execute('quit').catch(() => undefined);
      const done = await Promise.race([this.exited.then(() => true), new Promise<false>((r) => setTimeout(() => r(false), graceMs).unref())]);
      if (!done) {
        this.child.kill('SIGKILL');
        await this.exited;
      }
    }
    this.qmp.close();
    // QEMU leaves its socket files behind; they would only confuse the next owner (and `cp -a`).
    for (const s of [...this.sockets, join(this.runDir, 'qsd-qmp.sock')]) await rm(s, { force: true });
  }

  /** Last lines QEMU wrote to stderr (for error messages). */
  lastError(): string {
    return this.stderr().trim();
  }
}

/**
 * The daemon's environment: glibc keeps freed blocks up to 4 MiB in its heap instead of giving
 * each back to the kernel. Every encrypted read or write of ≥ 128 KiB takes a bounce buffer that
 * glibc would otherwise map and unmap per request, so each request paid for freshly zeroed pages
 * (perf: 6–7 % of the daemon's main thread in clear_page during a check-in's scan; the scan
 * ≈ 7 % faster with it, 5 runs each). A user's own GLIBC_TUNABLES wins.
 */
export function daemonEnv(env: NodeJS.ProcessEnv): NodeJS.ProcessEnv {
  if (env.GLIBC_TUNABLES !== undefined) return env;
  return { ...env, GLIBC_TUNABLES: 'glibc.malloc.mmap_threshold=4194304:glibc.malloc.trim_threshold=67108864' };
}
