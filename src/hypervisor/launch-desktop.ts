import { mkdir } from 'node:fs/promises';
import { join } from 'node:path';
import type { BlockDevice } from '../disk/block-device.js';
import { serveNbd } from '../nbd/server.js';
import { hostFacts, type HostFacts } from './host.js';
import { buildQemuCommand, launchDesktop, type OfflineConfig, type RunningDesktop } from './launch.js';

export interface RunDesktopOptions {
  name: string;
  disks: { name: string; device: BlockDevice }[];
  config: OfflineConfig;
  /** Private directory (created 0700) for the NBD and QMP sockets. */
  socketDir: string;
  dryRun?: boolean;
  display?: string;
  paused?: boolean;
  host?: HostFacts;
  /** Seal writes into the vault at least this often while the VM runs (default 5000 ms). */
  flushEveryMs?: number;
  /** Called once QEMU runs (e.g. to stop it from a signal handler). */
  onStarted?: (vm: RunningDesktop) => void;
  stdio?: 'inherit' | 'ignore';
  /** The disks are already served on this socket (e.g. by the client): start no second server. */
  existingNbdSocket?: string;
}

export interface RunDesktopResult {
  argv: string[];
  /** QEMU's exit code; absent for a dry run. */
  exitCode?: number;
}

/**
 * Serves the disks over NBD on a private unix socket, runs QEMU on them until it exits, then
 * flushes every disk (which records the dirty set). A dry run only builds the command line.
 */
export async function runDesktop(opts: RunDesktopOptions): Promise<RunDesktopResult> {
  await mkdir(opts.socketDir, { recursive: true, mode: 0o700 });
  const nbdSocket = opts.existingNbdSocket ?? join(opts.socketDir, 'nbd.sock');
  const qmpSocket = join(opts.socketDir, 'qmp.sock');
  const argv = buildQemuCommand(opts.config, opts.host ?? hostFacts(), opts.disks.map((d) => ({ name: d.name, socketPath: nbdSocket })), {
    name: opts.name,
    qmpSocket,
    display: opts.display,
    paused: opts.paused,
  });
  if (opts.dryRun) return { argv };
  const server = opts.existingNbdSocket ? null : await serveNbd(new Map(opts.disks.map((d) => [d.name, d.device])), { socketPath: nbdSocket });
  const flushAll = () => Promise.all(opts.disks.map((d) => d.device.flush()));
  const timer = setInterval(() => void flushAll().catch(() => undefined), opts.flushEveryMs ?? 5000);
  timer.unref();
  try {
    const vm = await launchDesktop(argv, qmpSocket, { stdio: opts.stdio });
    opts.onStarted?.(vm);
    const exitCode = await vm.exited;
    return { argv, exitCode };
  } finally {
    clearInterval(timer);
    await server?.close();
    await flushAll();
  }
}
