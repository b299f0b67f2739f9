import { CarryonError } from '../../core/errors.js';
import { listHostUsb, usbTestSeams, type HostUsbDevice } from '../../devices/usb-host.js';
import { decide, parseUsbId } from '../../devices/usb-rules.js';
import { ControlClient, type AttachedUsbView, type PowerAction } from '../../live/control.js';
import { effectiveConfig, usbRuleSets } from '../vault/guards.js';
import { readOwner } from '../../live/fill/holder.js';
import { loadDevice } from '../vault/home.js';
import { controlKey, liveSocketPath } from '../../live/live-holder.js';
import { powerOnline } from '../session/online.js';
import type { ClientEnv } from '../session/session.js';
import { Vault } from '../vault/vault.js';

/** A host USB device and whether the desktop's policy lets it through. */
export interface UsbListing extends HostUsbDevice {
  allowed: boolean;
  why?: string;
}

/**
 * The laptop's USB devices and, for a desktop, which its policy allows. Read without the
 * password (the state's config is not authenticated here): advice only; the holder decides
 * each attach against the authenticated config.
 */
export async function usbListing(env: ClientEnv, desktopRef?: string): Promise<{ desktop: string | null; devices: UsbListing[] }> {
  const devices = await listHostUsb(usbTestSeams().sysfs);
  const vault = await Vault.open(env.home);
  const all = await vault.list();
  const state = desktopRef !== undefined ? await vault.find(desktopRef) : all.length === 1 ? all[0] : undefined;
  if (!state) return { desktop: null, devices: devices.map((d) => ({ ...d, allowed: false, why: 'no desktop named (carryon usb list DESKTOP)' })) };
  const dir = vault.desktopDir(state.desktopId);
  const rules = await usbRuleSets(dir, await effectiveConfig(dir, state.config));
  return { desktop: state.name, devices: devices.map((d) => {
    const decision = decide(rules, d);
    return decision.ok ? { ...d, allowed: true } : { ...d, allowed: false, why: decision.why };
  }) };
}

/**
 * Runs `ask` on the control socket of the `carryon run` that holds this desktop (the password
 * unlocks the key its requests are MACed with), and closes the socket after.
 */
async function withRunningHolder<T>(env: ClientEnv, desktopRef: string, ask: (control: ControlClient, name: string) => Promise<T>): Promise<T> {
  const { control, name } = await runningHolder(env, desktopRef);
  try {
    return await ask(control, name);
  } finally {
    control.close();
  }
}

async function runningHolder(env: ClientEnv, desktopRef: string): Promise<{ control: ControlClient; name: string }> {
  const vault = await Vault.open(env.home);
  const found = await vault.find(desktopRef);
  const owner = await readOwner(vault, found.desktopId);
  if (!owner || owner.kind !== 'run') throw new CarryonError('not-running', `${found.name} is not running on this laptop (start it with \`carryon run ${found.name}\`)`);
  const { keys, state } = await vault.openKeys(await loadDevice(env.home), await env.password(), found);
  return { control: await ControlClient.connect(await liveSocketPath({ vault, state }), controlKey(keys, state.desktopId)), name: state.name };
}

export async function usbAttach(env: ClientEnv, desktopRef: string, usbId: string): Promise<AttachedUsbView> {
  const id = parseUsbId(usbId);
  return withRunningHolder(env, desktopRef, (control) => control.usbAttach(id.vendorId, id.productId));
}

export async function usbDetach(env: ClientEnv, desktopRef: string, usbId: string): Promise<AttachedUsbView> {
  const id = parseUsbId(usbId);
  return withRunningHolder(env, desktopRef, (control) => control.usbDetach(id.vendorId, id.productId));
}

export async function usbAttached(env: ClientEnv, desktopRef: string): Promise<AttachedUsbView[]> {
  return withRunningHolder(env, desktopRef, (control) => control.usbList());
}

/**
 * `carryon power`: to the `carryon run` holding the desktop on this laptop; a desktop not checked
 * out here goes to the broker, which has the host that runs it online do it (powerdown → stop,
 * reset → reset; suspend and resume are not offered for online desktops yet).
 */
export async function powerDesktop(env: ClientEnv, desktopRef: string, action: PowerAction): Promise<{ desktop: string; where: 'laptop' | 'online'; done: string }> {
  const vault = await Vault.open(env.home);
  const local = (await vault.list()).find((s) => s.desktopId === desktopRef || s.name === desktopRef);
  if (local) {
    return withRunningHolder(env, desktopRef, async (control, name) => ({ desktop: name, where: 'laptop' as const, done: await control.power(action) }));
  }
  if (action !== 'powerdown' && action !== 'reset') {
    throw new CarryonError('unsupported', `${action} is for a desktop running on this laptop; ${desktopRef} is not checked out here (online desktops take powerdown and reset)`);
  }
  const r = await powerOnline(env, desktopRef, action === 'powerdown' ? 'stop' : 'reset');
  return { desktop: r.desktop, where: 'online', done: `${r.state} on host ${r.host}` };
}
