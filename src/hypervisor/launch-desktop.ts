import { randomBytes } from 'node:crypto';
import { mkdir } from 'node:fs/promises';
import { join } from 'node:path';
import { hostFacts, type HostFacts } from './host.js';
import { buildQemuCommand, encryptSecret, launchDesktop, type OfflineConfig, type RunningDesktop } from './launch.js';

export interface RunDesktopOptions {
  name: string;
  /** Each disk's chain (-blockdev JSON, top node first) and LUKS passphrase (base64). */
  disks: { name: string; blockdev: Record<string, unknown>; secretId: string; secret: string; baseSecretId?: string; baseSecret?: string }[];
  config: OfflineConfig;
  /** Private directory (created 0700) for the QMP and guest agent sockets. */
  socketDir: string;
  dryRun?: boolean;
  display?: string;
  /** `--display vnc`: VNC on `<socketDir>/vnc.sock` (0700 directory), never a TCP port. */
  vnc?: boolean;
  monitors?: number;
  gl?: boolean;
  /** The print relay's command (printing allowed and a CUPS socket on the host). */
  printRelay?: string[];
  accel?: 'kvm' | 'tcg';
  serial?: string;
  extraArgs?: string[];
  paused?: boolean;
  host?: HostFacts;
  /** Called once QEMU runs (e.g. to stop it from a signal handler, or to start the fill). */
  onStarted?: (vm: RunningDesktop) => void;
  stdio?: 'inherit' | 'ignore';
}

export interface RunDesktopResult {
  argv: string[];
  /** Host end of the guest agent channel (`<socketDir>/qga.sock`), also on RunningDesktop. */
  guestAgentSocket: string;
  /** The VNC socket (`--display vnc`), else absent. */
  vncSocket?: string;
  /** QEMU's exit code; absent for a dry run. */
  exitCode?: number;
}

/**
 * Runs QEMU on the desktop's encrypted chains until it exits. The disk secrets travel encrypted
 * under a per-launch master key that QEMU reads once from a private FIFO. A dry run only builds
 * the command line (its secrets are useless without that key).
 */
export async function runDesktop(opts: RunDesktopOptions): Promise<RunDesktopResult> {
  await mkdir(opts.socketDir, { recursive: true, mode: 0o700 });
  const qmpSocket = join(opts.socketDir, 'qmp.sock');
  const guestAgentSocket = join(opts.socketDir, 'qga.sock');
  const masterKey = randomBytes(32);
  const disks = opts.disks.map((d) => ({
    name: d.name, blockdev: d.blockdev, secret: encryptSecret(d.secretId, d.secret, masterKey),
    baseSecret: d.baseSecretId && d.baseSecret !== undefined ? encryptSecret(d.baseSecretId, d.baseSecret, masterKey) : undefined,
  }));
  const argv = buildQemuCommand(opts.config, opts.host ?? hostFacts(), disks, {
    name: opts.name,
    qmpSocket,
    guestAgentSocket,
    display: opts.display,
    vncSocket: opts.vnc ? join(opts.socketDir, 'vnc.sock') : undefined,
    monitors: opts.monitors,
    gl: opts.gl,
    printRelay: opts.printRelay,
    paused: opts.paused,
    accel: opts.accel,
    serial: opts.serial,
    extraArgs: opts.extraArgs,
  });
  const vncSocket = opts.vnc ? join(opts.socketDir, 'vnc.sock') : undefined;
  if (opts.dryRun) return { argv, guestAgentSocket, vncSocket };
  const vm = await launchDesktop(argv, qmpSocket, { stdio: opts.stdio, masterKey, guestAgentSocket });
  opts.onStarted?.(vm);
  return { argv, guestAgentSocket, vncSocket, exitCode: await vm.exited };
}
