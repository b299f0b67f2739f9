import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync } from 'node:fs';
import { createInterface } from 'node:readline';

/**
 * Host suspend passed to the guest: logind announces PrepareForSleep(true) before the host sleeps
 * and PrepareForSleep(false) after it wakes. While the desktop runs we hold a *delay* inhibitor
 * lock, so the host waits (up to logind's InhibitDelayMaxSec) while the guest is suspended or paused;
 * we let go of it once the guest is, and take it again after the wake.
 */
export interface SleepHandlers {
  beforeSleep(): Promise<void>;
  afterWake(): Promise<void>;
}

/** The delay lock: held while a guest runs, released so the host may sleep. */
export interface Inhibitor {
  release(): void;
}

export interface SleepSource {
  /** Lines as `gdbus monitor` prints logind's signals. */
  lines: AsyncIterable<string>;
  inhibit(): Inhibitor;
  close(): void;
}

/** `PrepareForSleep (true,)` → true; other lines → null. */
export function parsePrepareForSleep(line: string): boolean | null {
  const m = /\.PrepareForSleep \((true|false),?\)/.exec(line);
  return m ? m[1] === 'true' : null;
}

/** Follows the source until it ends; each sleep and wake handled in turn, the lock held between. */
export async function followHostSleep(source: SleepSource, handlers: SleepHandlers, log: (l: string) => void): Promise<void> {
  let lock: Inhibitor | null = source.inhibit();
  try {
    for await (const line of source.lines) {
      const sleeping = parsePrepareForSleep(line);
      if (sleeping === true) {
        await handlers.beforeSleep().catch((err: unknown) => log(`before the host sleeps: ${(err as Error).message}`));
        lock?.release();
        lock = null;
      } else if (sleeping === false) {
        lock ??= source.inhibit();
        await handlers.afterWake().catch((err: unknown) => log(`after the host woke: ${(err as Error).message}`));
      }
    }
  } finally {
    lock?.release();
  }
}

/** Where the system bus is; null when there is none to reach (a container, a box without systemd). */
function systemBus(): string | null {
  const addr = process.env.DBUS_SYSTEM_BUS_ADDRESS;
  if (addr) return addr;
  return existsSync('/run/dbus/system_bus_socket') ? 'unix:path=/run/dbus/system_bus_socket' : null;
}

/**
 * logind through its command-line clients (gdbus monitor, systemd-inhibit): no D-Bus library in
 * the dependency tree. Null, with the reason, where the system bus is not there.
 */
export function logindSource(): { source: SleepSource | null; why?: string } {
  if (!systemBus()) return { source: null, why: 'no system D-Bus here (logind cannot announce host sleep)' };
  const monitor = spawn('gdbus', ['monitor', '--system', '--dest', 'org.freedesktop.login1', '--object-path', '/org/freedesktop/login1'], { stdio: ['ignore', 'pipe', 'ignore'] });
  monitor.on('error', () => undefined);
  const children = new Set<ChildProcess>([monitor]);
  return {
    source: {
      lines: createInterface({ input: monitor.stdout! }),
      inhibit() {
        // The lock's process reads our pipe: if carryon dies (even by SIGKILL) the pipe closes and the lock goes with it.
        const holder = spawn('systemd-inhibit', ['--what=sleep', '--mode=delay', '--who=carryon', '--why=suspending the desktop before the host sleeps', 'sh', '-c', 'read _'], { stdio: ['pipe', 'ignore', 'ignore'] });
        holder.on('error', () => undefined);
        children.add(holder);
        return {
          release() {
            holder.kill('SIGTERM');
            children.delete(holder);
          },
        };
      },
      close() {
        for (const c of children) c.kill('SIGTERM');
        children.clear();
      },
    },
  };
}
