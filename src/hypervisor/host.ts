import { spawn } from 'node:child_process';
import { accessSync, constants } from 'node:fs';
import { mkdtemp, readFile, rm, statfs } from 'node:fs/promises';
import { availableParallelism, tmpdir, totalmem } from 'node:os';
import { join } from 'node:path';

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

/**
 * Whether KVM really runs a guest here, not merely whether /dev/kvm opens: QEMU starts a KVM
 * machine with SeaBIOS, which writes its banner to the debug port within milliseconds when KVM
 * works. Where KVM opens but then fails (nested or broken virtualisation), nothing comes.
 */
export async function probeKvm(timeoutMs = 3000): Promise<{ ok: boolean; why?: string }> {
  if (!kvmUsable()) return { ok: false, why: '/dev/kvm is missing or not accessible to this user' };
  const dir = await mkdtemp(join(tmpdir(), 'carryon-kvm-'));
  const log = join(dir, 'debugcon');
  const child = spawn('qemu-system-x86_64', ['-accel', 'kvm', '-machine', 'pc', '-nodefaults', '-display', 'none', '-m', '32', '-chardev', `file,id=dbg,path=${log}`, '-device', 'isa-debugcon,iobase=0x402,chardev=dbg'], { stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  child.stderr?.setEncoding('utf8').on('data', (d: string) => (stderr += d));
  let exited = false;
  child.once('exit', () => (exited = true));
  child.once('error', () => (exited = true));
  try {
    for (let waited = 0; waited < timeoutMs; waited += 50) {
      await new Promise((r) => setTimeout(r, 50));
      const text = await readFile(log, 'utf8').catch(() => '');
      if (text.includes('SeaBIOS')) return { ok: true };
      if (exited) return { ok: false, why: stderr.trim().split('\n').pop() || 'QEMU could not start KVM' };
    }
    return { ok: false, why: `KVM opened but ran no guest code within ${timeoutMs} ms` };
  } finally {
    child.kill('SIGKILL');
    await rm(dir, { recursive: true, force: true });
  }
}

/**
 * Whether virgl 3D really works here, not whether a render node exists: QEMU is started with
 * virtio-vga-gl on an EGL display (the GL stack a window would use) and CPUs stopped. It fails
 * at once where there is no usable GL (no render node, no driver, a GL without what virgl needs);
 * still alive after `settleMs`, the stack is working.
 */
export async function probeVirgl(settleMs = 1500): Promise<{ ok: boolean; why?: string }> {
  const child = spawn('qemu-system-x86_64', ['-machine', 'q35', '-accel', 'tcg', '-nodefaults', '-S', '-m', '64', '-display', 'egl-headless', '-vga', 'none', '-device', 'virtio-vga-gl'], { stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  child.stderr?.setEncoding('utf8').on('data', (d: string) => (stderr += d));
  const exited = new Promise<{ code: number | null; err?: Error }>((resolve) => {
    child.once('exit', (code) => resolve({ code }));
    child.once('error', (err) => resolve({ code: null, err }));
  });
  const early = await Promise.race([exited, new Promise<null>((r) => setTimeout(() => r(null), settleMs))]);
  if (early) return { ok: false, why: early.err ? early.err.message : stderr.trim().split('\n').pop() || `QEMU exited (${early.code}) with virtio-vga-gl` };
  child.kill('SIGKILL');
  await exited;
  return { ok: true };
}
