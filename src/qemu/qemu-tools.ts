import { spawn, type ChildProcess, type StdioOptions } from 'node:child_process';
import { constants as fsConstants } from 'node:fs';
import { mkdtemp, open, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { CarryonError } from '../core/errors.js';

/**
 * QEMU 7.2's own words for an image another process holds open (block/file-posix.c: the byte
 * locks of raw_check_lock_bytes and raw_apply_lock_bytes; the perm name may hold spaces, as in
 * "consistent read"). Matched exactly: a loose /lock/ also caught "unlock any keyslot".
 */
const LOCK_CONFLICT = /Failed to get (shared )?"[a-z ]+" lock|Failed to lock byte \d+/;
/** crypto/block-luks.c: no key slot of the LUKS header opens with the secret given. */
const KEY_SLOT_REFUSED = /Invalid password, cannot unlock any keyslot/;

export const DISK_BUSY = 'the desktop disk is in use by another carryon process (run, serve, checkout or checkin): stop it first';
export const DISK_KEY_REFUSED = "the desktop's disk key does not open the disk's LUKS header: the disk file in the vault is damaged or was tampered with, and Carryon will not open it. Work not checked in is only in that file; `carryon rollback` gives the desktop back as last checked in, then check it out again (or ask your administrator to look at the file)";

/** What a QEMU error (a tool's stderr, or a QMP error's desc) means for the user: a code and a true message, or null (QEMU's own words will do). */
export function qemuFailure(text: string): { code: 'disk-busy' | 'disk-key-refused'; message: string } | null {
  if (KEY_SLOT_REFUSED.test(text)) return { code: 'disk-key-refused', message: DISK_KEY_REFUSED };
  if (LOCK_CONFLICT.test(text)) return { code: 'disk-busy', message: DISK_BUSY };
  return null;
}

/** A QEMU tool that failed; the message carries its own words (stderr). */
export class QemuToolError extends CarryonError {
  constructor(
    readonly tool: string,
    readonly exitCode: number | null,
    readonly stderr: string,
  ) {
    const words = stderr.trim().split('\n').slice(-3).join(' / ') || 'no message';
    const known = qemuFailure(stderr);
    super(known?.code ?? 'qemu-failed', known ? `${known.message} (${tool}: ${words})` : `${tool} failed (exit ${exitCode}): ${words}`);
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

/** setpriv's exit code when it cannot execute the tool (util-linux 2.38: "failed to execute"). */
const EXEC_FAILED = 127;

/**
 * Runs a QEMU tool to completion; stdout as text. Throws QemuToolError on a non-zero exit.
 * The tool dies with this process (setpriv --pdeathsig): one whose parent was killed would
 * otherwise wait forever in open() on its secret FIFO, which no one will ever write.
 */
export async function runQemuTool(tool: string, args: string[], opts: { secret?: string; okCodes?: number[] } = {}): Promise<{ stdout: string; stderr: string; code: number }> {
  const child = await spawnWithSecret('setpriv', ['--pdeathsig', 'SIGKILL', '--', tool, ...args], opts.secret);
  return new Promise((resolve, reject) => {
    let stdout = '';
    let stderr = '';
    child.stdout?.setEncoding('utf8').on('data', (d: string) => (stdout += d));
    child.stderr?.setEncoding('utf8').on('data', (d: string) => (stderr += d));
    child.once('error', (err: NodeJS.ErrnoException) => reject(err.code === 'ENOENT' ? missingTool('setpriv (util-linux)') : err));
    child.once('close', (code) => {
      if (code === 0 || (code !== null && opts.okCodes?.includes(code))) resolve({ stdout, stderr, code: code ?? 0 });
      else if (code === EXEC_FAILED && /^setpriv: failed to execute/m.test(stderr)) reject(missingTool(tool));
      else reject(new QemuToolError(tool, code, stderr));
    });
  });
}
