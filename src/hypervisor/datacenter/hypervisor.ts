import { QmpConnection } from '../../qemu/qmp.js';

export { QmpConnection };

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
