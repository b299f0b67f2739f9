import { spawn } from 'node:child_process';
import { accessSync, constants } from 'node:fs';

export interface OfflineConfig {
  vcpus: number;
  ramMiB: number;
  usb: boolean;
  nic: string;
  /** Local settings kept across check-outs (the broker never overrides them). */
  display?: string;
  usbDevices?: { vendorId: string; productId: string }[];
}

export function kvmUsable(): boolean {
  try {
    accessSync('/dev/kvm', constants.R_OK | constants.W_OK);
    return true;
  } catch {
    return false;
  }
}

/**
 * Pure: the QEMU command line for an offline desktop. Disks come from the NBD socket (never a
 * decrypted file); the NIC is user-mode (no host port opened); USB passthrough only if allowed.
 */
export function buildQemuCommand(config: OfflineConfig, disks: { name: string; socketPath: string }[], opts: { kvm: boolean; qmpSocket: string; name: string }): string[] {
  const argv = ['qemu-system-x86_64', '-name', opts.name, '-machine', 'q35', '-accel', opts.kvm ? 'kvm' : 'tcg', '-smp', String(config.vcpus), '-m', `${config.ramMiB}M`];
  if (opts.kvm) argv.push('-cpu', 'host');
  disks.forEach((d, i) => {
    argv.push('-blockdev', `driver=nbd,node-name=disk${i},server.type=unix,server.path=${d.socketPath},export=${d.name},cache.direct=off`);
    argv.push('-device', `virtio-blk-pci,drive=disk${i}${i === 0 ? ',bootindex=0' : ''}`);
  });
  argv.push(...(config.nic === 'none' ? ['-nic', 'none'] : ['-nic', 'user,model=virtio-net-pci']));
  argv.push('-display', config.display ?? 'gtk');
  argv.push('-qmp', `unix:${opts.qmpSocket},server=on,wait=off`);
  if (config.usb) {
    argv.push('-device', 'qemu-xhci,id=xhci');
    for (const u of config.usbDevices ?? []) argv.push('-device', `usb-host,bus=xhci.0,vendorid=0x${u.vendorId},productid=0x${u.productId}`);
  }
  return argv;
}

/** Runs QEMU until it exits; resolves with its exit code. */
export function launchQemu(argv: string[], signal?: AbortSignal): Promise<number> {
  return new Promise((resolve, reject) => {
    const child = spawn(argv[0]!, argv.slice(1), { stdio: 'inherit' });
    signal?.addEventListener('abort', () => child.kill('SIGTERM'), { once: true });
    child.on('error', reject);
    child.on('exit', (code, sig) => resolve(code ?? (sig ? 128 : 1)));
  });
}
