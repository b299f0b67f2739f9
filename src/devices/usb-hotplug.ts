import { CarryonError } from '../core/errors.js';
import type { QmpEvent } from '../qemu/qmp.js';
import type { HostUsbDevice } from './usb-host.js';
import { decide, type UsbRules } from './usb-rules.js';

/** The QMP calls hot-plug needs (a QmpConnection, or a test's stand-in). */
export interface UsbQmp {
  execute(command: string, args?: Record<string, unknown>): Promise<unknown>;
  waitEvent(match: (e: QmpEvent) => boolean, timeoutMs: number): Promise<QmpEvent>;
}

/** The xhci controller `run` gives every desktop USB is allowed for (launch.ts). */
export const USB_BUS = 'xhci.0';

/**
 * How a host device becomes a QEMU device. The real one passes the host's device through
 * (usb-host by bus and address); tests put QEMU's emulated devices in its place.
 */
export interface UsbBackend {
  plug(qmp: UsbQmp, dev: HostUsbDevice, id: string): Promise<void>;
  /** After QEMU deleted the device: whatever plug made besides it. */
  unplugged?(qmp: UsbQmp, id: string): Promise<void>;
}

export const hostPassthrough: UsbBackend = {
  async plug(qmp, dev, id) {
    await qmp.execute('device_add', { driver: 'usb-host', id, bus: USB_BUS, hostbus: dev.bus, hostaddr: dev.address });
  },
};

/**
 * Test stand-in (NODE_ENV=test only): a storage-class device becomes QEMU's usb-storage on an
 * empty null-co drive, anything else a usb-kbd, so hot-plug, refusal and policy detach run
 * against a real QEMU with no USB hardware.
 */
export const emulatedDevices: UsbBackend = {
  async plug(qmp, dev, id) {
    if (dev.classes.includes('08')) {
      await qmp.execute('blockdev-add', { driver: 'null-co', 'node-name': `${id}-disk`, size: 1 << 20, 'read-zeroes': true });
      await qmp.execute('device_add', { driver: 'usb-storage', id, bus: USB_BUS, drive: `${id}-disk` });
    } else await qmp.execute('device_add', { driver: 'usb-kbd', id, bus: USB_BUS });
  },
  async unplugged(qmp, id) {
    await qmp.execute('blockdev-del', { 'node-name': `${id}-disk` }).catch(() => undefined);
  },
};

export interface AttachedUsb {
  id: string;
  device: HostUsbDevice;
  at: string;
}

export type UsbAction = 'usb-attach' | 'usb-refused' | 'usb-detach';

export interface UsbHotplugOptions {
  /** Every rule set the device must pass, read afresh at each decision (a policy change applies at once). */
  rules: () => Promise<UsbRules[]>;
  /** The host's devices now (devices/usb-host.ts). */
  devices: () => Promise<HostUsbDevice[]>;
  /** Audit: every attach, refusal and detach, for the broker at its next contact. */
  record: (action: UsbAction, detail: string) => Promise<void>;
  log: (l: string) => void;
  backend?: UsbBackend;
  /** How long QEMU may take to confirm an unplug. */
  unplugTimeoutMs?: number;
}

const label = (d: HostUsbDevice) => `${d.vendorId}:${d.productId}${d.product ? ` (${[d.manufacturer, d.product].filter(Boolean).join(' ')})` : ''} at ${d.bus}-${d.address}`;

/**
 * Hot-plug of host USB devices into a running desktop, by policy: every attach is decided against
 * the rules as they are at that moment, and `enforce` takes out what a changed policy no longer
 * lets through. One operation at a time, so an attach and a policy change cannot cross.
 */
export class UsbHotplug {
  private readonly plugged = new Map<string, AttachedUsb>();
  private queue: Promise<unknown> = Promise.resolve();

  constructor(private readonly qmp: UsbQmp, private readonly opts: UsbHotplugOptions) {}

  private serial<T>(fn: () => Promise<T>): Promise<T> {
    const next = this.queue.then(fn, fn);
    this.queue = next.catch(() => undefined);
    return next;
  }

  attached(): AttachedUsb[] {
    return [...this.plugged.values()];
  }

  attach(vendorId: string, productId: string): Promise<AttachedUsb> {
    return this.serial(async () => {
      const id = `${vendorId}:${productId}`;
      const candidates = (await this.opts.devices()).filter((d) => d.vendorId === vendorId && d.productId === productId);
      const dev = candidates.find((d) => !this.plugged.has(qemuId(d)));
      if (!dev) {
        const why = candidates.length ? `every ${id} on this laptop is already attached` : `no USB device ${id} is plugged into this laptop (carryon usb list)`;
        throw new CarryonError(candidates.length ? 'already-attached' : 'not-found', why);
      }
      const decision = decide(await this.opts.rules(), dev);
      if (!decision.ok) {
        await this.opts.record('usb-refused', `${label(dev)}: ${decision.why}`);
        this.opts.log(`USB ${label(dev)} refused: ${decision.why}`);
        throw new CarryonError('policy', `USB ${id} refused: ${decision.why}`);
      }
      const qid = qemuId(dev);
      await (this.opts.backend ?? hostPassthrough).plug(this.qmp, dev, qid);
      const entry = { id: qid, device: dev, at: new Date().toISOString() };
      this.plugged.set(qid, entry);
      await this.opts.record('usb-attach', label(dev));
      this.opts.log(`USB ${label(dev)} attached`);
      return entry;
    });
  }

  /** Detaches the first attached device with these IDs. */
  detach(vendorId: string, productId: string, why = 'detached by the user'): Promise<AttachedUsb> {
    return this.serial(async () => {
      const entry = this.attached().find((a) => a.device.vendorId === vendorId && a.device.productId === productId);
      if (!entry) throw new CarryonError('not-found', `no USB device ${vendorId}:${productId} is attached to this desktop`);
      await this.unplug(entry, why);
      return entry;
    });
  }

  /** Detaches every attached device the rules no longer let through; returns what it took out. */
  enforce(): Promise<AttachedUsb[]> {
    return this.serial(async () => {
      const rules = await this.opts.rules();
      const out: AttachedUsb[] = [];
      for (const entry of this.attached()) {
        const decision = decide(rules, entry.device);
        if (decision.ok) continue;
        await this.unplug(entry, `policy changed: ${decision.why}`);
        out.push(entry);
      }
      return out;
    });
  }

  /** Forgets a device the guest or QEMU removed on its own (unplugged from the laptop). */
  forget(id: string): void {
    this.plugged.delete(id);
  }

  private async unplug(entry: AttachedUsb, why: string): Promise<void> {
    const deleted = this.qmp.waitEvent((e) => e.event === 'DEVICE_DELETED' && e.data?.device === entry.id, this.opts.unplugTimeoutMs ?? 10_000);
    deleted.catch(() => undefined);
    await this.qmp.execute('device_del', { id: entry.id });
    // USB unplug needs no guest cooperation: QEMU confirms it at once; until then it is not gone.
    await deleted;
    this.plugged.delete(entry.id);
    await this.opts.backend?.unplugged?.(this.qmp, entry.id);
    await this.opts.record('usb-detach', `${label(entry.device)}: ${why}`);
    this.opts.log(`USB ${label(entry.device)} detached: ${why}`);
  }
}

/** QEMU's id for a passed-through device: its IDs and where it sits, so two of a kind differ. */
export function qemuId(d: HostUsbDevice): string {
  return `usb-${d.vendorId}-${d.productId}-${d.bus}-${d.address}`;
}
