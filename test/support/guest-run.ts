import { spawn } from 'node:child_process';
import { readFileSync } from 'node:fs';

/**
 * `carryon run` of the test guest in the background (guest-boot and guest-desktop tests): its
 * stderr kept, its serial log readable at any time (empty until QEMU makes it).
 */
export function backgroundRun(cli: string, args: string[], env: NodeJS.ProcessEnv, serialPath: string) {
  const child = spawn(process.execPath, [cli, ...args], { env, stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  child.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
  const exited = new Promise<number | null>((r) => child.once('exit', (code) => r(code)));
  return {
    child,
    exited,
    stderr: () => stderr,
    serial(): string {
      try {
        return readFileSync(serialPath, 'utf8');
      } catch {
        return '';
      }
    },
    /** QEMU's (and `carryon run`'s) end, or 'timeout'. */
    exit: (ms: number) => Promise.race([exited, new Promise<'timeout'>((r) => setTimeout(() => r('timeout'), ms).unref())]),
  };
}
