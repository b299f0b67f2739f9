import { readdir, readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { listHostUsb } from './usb-host.js';

/** What this laptop can offer a desktop's screen and USB, for the admin (the agent's heartbeat). */
export interface HardwareFacts {
  display: {
    /** The window system `run` would open its window on; null where there is none (a headless box). */
    windowSystem: 'wayland' | 'x11' | null;
    /** Monitors connected now (DRM connectors whose status is `connected`). */
    monitors: number;
    /** virgl 3D works (a probe ran QEMU with it); null where it was not probed. */
    gl: boolean | null;
  };
  /** USB devices plugged in now: IDs and classes, no serial numbers. */
  usb: { id: string; classes: string[]; name?: string }[];
}

export const SYSFS_DRM = '/sys/class/drm';

async function connectedMonitors(root: string): Promise<number> {
  let names: string[];
  try {
    names = await readdir(root);
  } catch {
    return 0;
  }
  let n = 0;
  for (const name of names) {
    // Connectors are card<N>-<type>-<i>; the cards themselves have no status.
    if (!/^card\d+-/.test(name)) continue;
    const status = await readFile(join(root, name, 'status'), 'utf8').catch(() => '');
    if (status.trim() === 'connected') n++;
  }
  return n;
}

export async function hardwareFacts(opts: { usbRoot?: string; drmRoot?: string; env?: NodeJS.ProcessEnv; gl?: boolean | null } = {}): Promise<HardwareFacts> {
  const env = opts.env ?? process.env;
  const usb = await listHostUsb(opts.usbRoot);
  return {
    display: {
      windowSystem: env.WAYLAND_DISPLAY ? 'wayland' : env.DISPLAY ? 'x11' : null,
      monitors: await connectedMonitors(opts.drmRoot ?? SYSFS_DRM),
      gl: opts.gl ?? null,
    },
    usb: usb.slice(0, 64).map((d) => ({
      id: `${d.vendorId}:${d.productId}`, classes: d.classes,
      ...(d.product ? { name: [d.manufacturer, d.product].filter(Boolean).join(' ').slice(0, 200) } : {}),
    })),
  };
}
