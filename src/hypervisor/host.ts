import { accessSync, constants } from 'node:fs';
import { statfs } from 'node:fs/promises';
import { availableParallelism, totalmem } from 'node:os';

/** What the laptop offers a desktop: checked before launch and sent with a check-out request. */
export interface HostFacts {
  cpus: number;
  ramBytes: number;
  kvm: boolean;
}

/** /dev/kvm exists and this user may open it read-write (else QEMU falls back to TCG). */
export function kvmUsable(path = '/dev/kvm'): boolean {
  try {
    accessSync(path, constants.R_OK | constants.W_OK);
    return true;
  } catch {
    return false;
  }
}

export function hostFacts(): HostFacts {
  return { cpus: availableParallelism(), ramBytes: totalmem(), kvm: kvmUsable() };
}

/** Bytes available to this user on the filesystem holding `path`. */
export async function freeDiskBytes(path: string): Promise<number> {
  const fs = await statfs(path);
  return fs.bavail * fs.bsize;
}
