import { readdir, readFile } from 'node:fs/promises';
import { join } from 'node:path';
import type { UsbIdentity } from './usb-rules.js';

/** A USB device plugged into this laptop, as sysfs describes it. */
export interface HostUsbDevice extends UsbIdentity {
  /** sysfs name (`1-2.3`): stable while the device stays in its port. */
  port: string;
  bus: number;
  address: number;
  manufacturer?: string;
  product?: string;
}

export const SYSFS_USB = '/sys/bus/usb/devices';

/** Test seams (NODE_ENV=test only): a fake sysfs tree, and QEMU's emulated devices in place of usb-host. */
export function usbTestSeams(): { sysfs?: string; emulated: boolean } {
  if (process.env.NODE_ENV !== 'test') return { emulated: false };
  return { sysfs: process.env.CARRYON_TEST_USB_SYSFS || undefined, emulated: process.env.CARRYON_TEST_USB_EMULATED === '1' };
}

const hex = /^[0-9a-f]{2,4}$/i;

async function attr(dir: string, name: string): Promise<string | undefined> {
  try {
    return (await readFile(join(dir, name), 'utf8')).trim();
  } catch {
    return undefined;
  }
}

/**
 * The host's USB devices from sysfs (root injectable for tests). Root hubs (`usbN`) and hubs are
 * left out: passing a hub through is not something a user means. Entries that do not read whole
 * are skipped rather than guessed at.
 */
export async function listHostUsb(root = SYSFS_USB): Promise<HostUsbDevice[]> {
  let names: string[];
  try {
    names = await readdir(root);
  } catch {
    return []; // no USB bus here (a VM, a container)
  }
  const out: HostUsbDevice[] = [];
  for (const name of names.sort()) {
    if (name.includes(':') || name.startsWith('usb')) continue; // interfaces; root hubs
    const dir = join(root, name);
    const [vendorId, productId, devClass, busnum, devnum] = await Promise.all(['idVendor', 'idProduct', 'bDeviceClass', 'busnum', 'devnum'].map((a) => attr(dir, a)));
    if (!vendorId || !productId || !hex.test(vendorId) || !hex.test(productId)) continue;
    const bus = Number(busnum);
    const address = Number(devnum);
    if (!Number.isInteger(bus) || !Number.isInteger(address) || bus < 1 || address < 1) continue;
    const classes = new Set<string>();
    if (devClass && hex.test(devClass) && devClass.toLowerCase() !== '00') classes.add(devClass.toLowerCase());
    // Interfaces are siblings named `<device>:<config>.<interface>`.
    for (const n of names) {
      if (!n.startsWith(`${name}:`)) continue;
      const c = await attr(join(root, n), 'bInterfaceClass');
      if (c && hex.test(c)) classes.add(c.toLowerCase());
    }
    if (classes.has('09')) continue; // a hub
    out.push({
      port: name, vendorId: vendorId.toLowerCase(), productId: productId.toLowerCase(), bus, address, classes: [...classes].sort(),
      manufacturer: await attr(dir, 'manufacturer'), product: await attr(dir, 'product'),
    });
  }
  return out;
}
