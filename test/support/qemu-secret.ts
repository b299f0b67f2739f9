/**
 * Hands secrets to a QEMU process (qemu-img, qemu-nbd, qemu-storage-daemon, qemu-system-*) as
 * `--object secret,id=…,file=<fifo>` without putting them in argv, the environment, or a file
 * with contents: each secret goes through a named pipe in a private 0700 directory, written once
 * QEMU opens it, and the directory is removed afterwards.
 *
 * Why not `file=/dev/fd/3` with a Node 'pipe': Node's child pipes are socketpairs, and opening a
 * socket through /dev/fd fails with ENXIO ("No such device or address").
 */
import { execFile, type ChildProcess } from 'node:child_process';
import { constants } from 'node:fs';
import { mkdtemp, open, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';

const run = promisify(execFile);

export class QemuSecrets {
  private constructor(
    private readonly dir: string,
    private readonly items: Array<{ id: string; path: string; data: Buffer }>,
  ) {}

  /** One FIFO per secret id; secrets are text for QEMU's default `format=raw`. */
  static async create(secrets: Record<string, string | Buffer>): Promise<QemuSecrets> {
    const dir = await mkdtemp(join(tmpdir(), 'carryon-secret-')); // mkdtemp makes it 0700
    try {
      const items = Object.entries(secrets).map(([id, data], i) => {
        if (!/^[A-Za-z][A-Za-z0-9_-]*$/.test(id)) throw new Error(`bad QEMU object id: ${id}`);
        return { id, path: join(dir, `s${i}`), data: Buffer.from(data) };
      });
      for (const it of items) await run('mkfifo', ['-m', '0600', it.path]);
      return new QemuSecrets(dir, items);
    } catch (e) {
      await rm(dir, { recursive: true, force: true });
      throw e;
    }
  }

  /** `--object secret,…` arguments, in the order QEMU will read them. */
  args(): string[] {
    return this.items.flatMap((it) => ['--object', `secret,id=${it.id},file=${it.path}`]);
  }

  /**
   * Writes each secret when `child` opens its FIFO (QEMU reads them in argument order). Opening
   * the write end non-blocking fails with ENXIO until a reader is there, so a child that dies
   * first is noticed instead of hanging the caller.
   */
  async deliver(child: ChildProcess, timeoutMs = 60_000): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    for (const it of this.items) {
      for (;;) {
        if (child.exitCode !== null || child.signalCode !== null) throw new Error(`QEMU exited before reading secret ${it.id}`);
        try {
          const fh = await open(it.path, constants.O_WRONLY | constants.O_NONBLOCK);
          try {
            await fh.write(it.data); // far below the pipe's buffer: never blocks
          } finally {
            await fh.close(); // EOF tells QEMU the secret is complete
          }
          break;
        } catch (e) {
          if ((e as NodeJS.ErrnoException).code !== 'ENXIO') throw e;
          if (Date.now() > deadline) throw new Error(`QEMU did not read secret ${it.id} within ${timeoutMs / 1000}s`);
          await new Promise((r) => setTimeout(r, 5));
        }
      }
    }
  }

  async close(): Promise<void> {
    await rm(this.dir, { recursive: true, force: true });
  }
}
