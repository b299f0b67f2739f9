import { spawn, type ChildProcess, type StdioOptions } from 'node:child_process';
import { constants as fsConstants } from 'node:fs';
import { mkdtemp, open, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { CarryonError } from '../core/errors.js';

/** A QEMU tool that failed; the message carries its own words (stderr). */
export class QemuToolError extends CarryonError {
  constructor(
    readonly tool: string,
    readonly exitCode: number | null,
    readonly stderr: string,
  ) {
    super(/lock/i.test(stderr) ? 'disk-busy' : 'qemu-failed', `${tool} failed (exit ${exitCode}): ${stderr.trim().split('\n').slice(-3).join(' / ') || 'no message'}`);
  }
}

export function missingTool(tool: string): CarryonError {
  return new CarryonError('missing-tool', `${tool} is not installed: run scripts/install-deps (Debian/Ubuntu packages qemu-utils, qemu-system-x86, qemu-system-common)`);
}

/** The secret object QEMU tools read from a private FIFO: never argv, the environment or a file at rest. */
export const SECRET_FIFO = '@SECRET@';
export const SECRET_FD_OBJECT = (id: string) => `secret,id=${id},file=${SECRET_FIFO},format=raw`;

/**
 * Spawns `tool`; an argument containing `@SECRET@` gets the path of a FIFO (in a fresh 0700
 * directory) through which `secret` is handed over once, then the FIFO is removed. A FIFO rather
 * than an inherited fd: Node's extra stdio are socketpairs, which QEMU cannot open as /dev/fd/N.
 */
export async function spawnWithSecret(tool: string, args: string[], secret: string | undefined, stdio: StdioOptions = ['ignore', 'pipe', 'pipe']): Promise<ChildProcess> {
  if (secret === undefined || !args.some((a) => a.includes(SECRET_FIFO))) return spawn(tool, args, { stdio });
  const dir = await mkdtemp(join(tmpdir(), 'carryon-s-'));
  const fifo = join(dir, 'secret');
  await new Promise<void>((resolve, reject) => {
    const mk = spawn('mkfifo', ['-m', '0600', fifo], { stdio: 'ignore' });
    mk.once('error', reject);
    mk.once('close', (code) => (code === 0 ? resolve() : reject(new Error(`mkfifo failed (${code})`))));
  });
  const child = spawn(tool, args.map((a) => a.split(SECRET_FIFO).join(fifo)), { stdio });
  let exited = false;
  const cleanup = () => rm(dir, { recursive: true, force: true }).catch(() => undefined);
  // Opening the write end blocks until the tool opens the read end; if it dies first, a reader
  // of our own unblocks the open so nothing hangs.
  const handOver = (async () => {
    const fh = await open(fifo, 'w');
    try {
      if (!exited) await fh.writeFile(secret);
    } finally {
      await fh.close();
    }
  })().catch(() => undefined).finally(cleanup);
  child.once('exit', () => {
    exited = true;
    open(fifo, fsConstants.O_RDONLY | fsConstants.O_NONBLOCK).then((fh) => fh.close()).catch(() => undefined);
    void handOver;
  });
  child.once('error', () => {
    exited = true;
    open(fifo, fsConstants.O_RDONLY | fsConstants.O_NONBLOCK).then((fh) => fh.close()).catch(() => undefined);
  });
  return child;
}

/** Runs a QEMU tool to completion; stdout as text. Throws QemuToolError on a non-zero exit. */
export async function runQemuTool(tool: string, args: string[], opts: { secret?: string; okCodes?: number[] } = {}): Promise<{ stdout: string; stderr: string; code: number }> {
  const child = await spawnWithSecret(tool, args, opts.secret);
  return new Promise((resolve, reject) => {
    let stdout = '';
    let stderr = '';
    child.stdout?.setEncoding('utf8').on('data', (d: string) => (stdout += d));
    child.stderr?.setEncoding('utf8').on('data', (d: string) => (stderr += d));
    child.once('error', (err: NodeJS.ErrnoException) => reject(err.code === 'ENOENT' ? missingTool(tool) : err));
    child.once('close', (code) => {
      if (code === 0 || (code !== null && opts.okCodes?.includes(code))) resolve({ stdout, stderr, code: code ?? 0 });
      else reject(new QemuToolError(tool, code, stderr));
    });
  });
}
