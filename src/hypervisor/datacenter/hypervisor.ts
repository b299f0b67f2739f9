import { connect } from 'node:net';

/** The datacenter copy's power control. The broker powers a desktop down before a checkpoint. */
export interface DatacenterHypervisor {
  readonly kind: string;
  isRunning(desktopId: string): Promise<boolean>;
  /** Graceful shutdown, forced after `timeoutMs`. */
  powerOff(desktopId: string, timeoutMs?: number): Promise<void>;
}

/** No datacenter VMs (images only): nothing runs, nothing to stop. */
export class NoHypervisor implements DatacenterHypervisor {
  readonly kind = 'none';
  async isRunning(): Promise<boolean> {
    return false;
  }
  async powerOff(): Promise<void> {}
}

/** Minimal QMP client over a unix socket: capabilities handshake, then commands and events. */
export class QmpConnection {
  private buf = '';
  private waiters: ((msg: Record<string, unknown>) => void)[] = [];
  private events: Record<string, unknown>[] = [];
  private constructor(private readonly sock: import('node:net').Socket) {
    sock.setEncoding('utf8');
    sock.on('data', (d: string) => {
      this.buf += d;
      let nl;
      while ((nl = this.buf.indexOf('\n')) >= 0) {
        const line = this.buf.slice(0, nl).trim();
        this.buf = this.buf.slice(nl + 1);
        if (!line) continue;
        const msg = JSON.parse(line) as Record<string, unknown>;
        if ('event' in msg) this.events.push(msg);
        else this.waiters.shift()?.(msg);
      }
    });
  }

  static async open(path: string): Promise<QmpConnection> {
    const sock = connect(path);
    await new Promise<void>((resolve, reject) => {
      sock.once('connect', resolve);
      sock.once('error', reject);
    });
    const qmp = new QmpConnection(sock);
    await qmp.next(); // greeting
    await qmp.execute('qmp_capabilities');
    return qmp;
  }

  private next(): Promise<Record<string, unknown>> {
    return new Promise((resolve) => this.waiters.push(resolve));
  }

  async execute(command: string, args?: Record<string, unknown>): Promise<unknown> {
    const reply = this.next();
    this.sock.write(`${JSON.stringify(args ? { execute: command, arguments: args } : { execute: command })}\n`);
    const msg = await reply;
    if ('error' in msg) throw new Error(`QMP ${command}: ${JSON.stringify(msg.error)}`);
    return msg.return;
  }

  sawEvent(name: string): boolean {
    return this.events.some((e) => e.event === name);
  }

  close(): void {
    this.sock.destroy();
  }
}

/** Desktops run as QEMU processes with a QMP socket at `<socketDir>/<desktopId>.qmp`. */
export class QmpHypervisor implements DatacenterHypervisor {
  readonly kind = 'qmp';
  constructor(private readonly socketDir: string) {}

  private path(desktopId: string): string {
    return `${this.socketDir}/${desktopId}.qmp`;
  }

  async isRunning(desktopId: string): Promise<boolean> {
    try {
      const qmp = await QmpConnection.open(this.path(desktopId));
      const status = (await qmp.execute('query-status')) as { running?: boolean; status?: string };
      qmp.close();
      return status.status !== 'shutdown';
    } catch {
      return false;
    }
  }

  async powerOff(desktopId: string, timeoutMs = 60_000): Promise<void> {
    let qmp: QmpConnection;
    try {
      qmp = await QmpConnection.open(this.path(desktopId));
    } catch {
      return; // not running
    }
    try {
      await qmp.execute('system_powerdown');
      const deadline = Date.now() + timeoutMs;
      while (Date.now() < deadline && !qmp.sawEvent('SHUTDOWN')) await new Promise((r) => setTimeout(r, 200));
      await qmp.execute('quit').catch(() => undefined);
    } finally {
      qmp.close();
    }
  }
}
