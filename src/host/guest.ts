import { randomBytes } from 'node:crypto';
import { join } from 'node:path';
import { chainBlockdev, layerSecret, type Chain } from '../disk/chain.js';
import { hostFacts } from '../hypervisor/host.js';
import { buildQemuCommand, encryptSecret, launchDesktop, type RunningDesktop } from '../hypervisor/launch.js';

export interface GuestSpec {
  desktopId: string;
  config: { vcpus: number; ramMiB: number; nic: 'user' | 'none' };
  disks: { name: string; chain: Chain }[];
  accel: 'kvm' | 'tcg';
  /** Private directory for the QMP socket and the serial log. */
  socketDir: string;
  /** Start with the CPUs stopped (tests: proves the host opened the chain and started QEMU, at no CPU cost). */
  paused?: boolean;
}

/**
 * Starts QEMU on the desktop's chains, headless: each base read-only under its writable top,
 * each layer's LUKS passphrase encrypted under a per-launch key QEMU reads once from a FIFO (the
 * laptop's launch path, hypervisor/launch.ts). The NIC is user-mode (no host port).
 */
export async function startGuest(spec: GuestSpec): Promise<RunningDesktop> {
  const masterKey = randomBytes(32);
  const disks = spec.disks.map((d, i) => {
    const ids = { top: `host-d${i}-top`, base: `host-d${i}-base` };
    return {
      name: d.name,
      blockdev: chainBlockdev({ files: d.chain.files, secretId: ids.top, baseSecretId: ids.base, baseReadOnly: true, prefix: `d${i}` }),
      secret: encryptSecret(ids.top, layerSecret(d.chain, 'top'), masterKey),
      baseSecret: encryptSecret(ids.base, layerSecret(d.chain, 'base'), masterKey),
    };
  });
  const qmpSocket = join(spec.socketDir, 'qmp.sock');
  const guestAgentSocket = join(spec.socketDir, 'qga.sock');
  const argv = buildQemuCommand({ vcpus: spec.config.vcpus, ramMiB: spec.config.ramMiB, nic: spec.config.nic, usb: false, usbDevices: [] }, hostFacts(), disks, {
    name: `carryon-${spec.desktopId.replace(/[^A-Za-z0-9]/g, '').slice(0, 32)}`,
    qmpSocket, guestAgentSocket, accel: spec.accel, display: 'none', serial: join(spec.socketDir, 'serial.log'), paused: spec.paused,
    // The screen, for the broker's relay (issue 26 item 3, not built yet): only on the private socket directory (0700).
    vncSocket: vncSocketPath(spec.socketDir),
  });
  return launchDesktop(argv, qmpSocket, { stdio: 'ignore', masterKey, guestAgentSocket });
}

/** Where a guest's VNC server listens: beside its QMP socket, in the host's private directory for it. */
export const vncSocketPath = (socketDir: string) => join(socketDir, 'vnc.sock');

/** Power off now: QMP quit, SIGKILL if QEMU is still there after 10 s. */
export async function forceOff(vm: RunningDesktop): Promise<number> {
  await vm.qmp('quit').catch(() => undefined);
  const code = await Promise.race([vm.exited, new Promise<null>((r) => setTimeout(() => r(null), 10_000).unref())]);
  if (code !== null) return code;
  vm.kill();
  return vm.exited;
}
