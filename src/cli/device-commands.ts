import type { Command } from 'commander';
import { powerDesktop, usbAttach, usbAttached, usbDetach, usbListing } from '../client/devices/devices.js';
import { defaultHome } from '../client/vault/home.js';
import type { ClientEnv } from '../client/session/session.js';
import { CarryonError } from '../core/errors.js';
import { className } from '../devices/usb-rules.js';
import { POWER_ACTIONS, type PowerAction } from '../live/control.js';
import { passwordSource, printJsonOr, table } from './common.js';

interface GlobalOpts { home?: string; user?: string; passwordFile?: string; json?: boolean }

function env(cmd: Command): { env: ClientEnv; json: boolean } {
  const o = cmd.optsWithGlobals<GlobalOpts>();
  return { env: { home: o.home ?? defaultHome(), user: o.user ?? process.env.CARRYON_USER, password: passwordSource(o), log: (l: string) => process.stderr.write(`${l}\n`) }, json: Boolean(o.json) };
}

/** Devices in the running desktop: USB by policy, power events. */
export function registerDeviceCommands(program: Command): void {
  const usb = program.command('usb').description('USB devices of this laptop in a running desktop, as its policy allows');
  usb.command('list [desktop]').description("this laptop's USB devices and which the desktop's policy allows")
    .action(async (desktop: string | undefined, _o: unknown, cmd: Command) => {
      const { env: e, json } = env(cmd);
      const r = await usbListing(e, desktop);
      printJsonOr(json, r, () => {
        if (r.devices.length === 0) return void process.stdout.write('no USB devices on this laptop\n');
        table(r.devices.map((d) => ({
          id: `${d.vendorId}:${d.productId}`, at: `${d.bus}-${d.address}`, name: [d.manufacturer, d.product].filter(Boolean).join(' ') || '-',
          classes: d.classes.map(className).join(', ') || '-', [r.desktop ?? 'policy']: d.allowed ? 'allowed' : `no: ${d.why ?? ''}`,
        })));
      });
    });
  usb.command('attach <desktop> <vendor:product>').description('pass a USB device through to the running desktop (hot-plug; refused where the policy forbids it)')
    .action(async (desktop: string, id: string, _o: unknown, cmd: Command) => {
      const { env: e, json } = env(cmd);
      const d = await usbAttach(e, desktop, id);
      printJsonOr(json, d, () => process.stdout.write(`attached ${d.vendorId}:${d.productId}${d.name ? ` (${d.name})` : ''} to ${desktop}\n`));
    });
  usb.command('detach <desktop> <vendor:product>').description('take a USB device out of the running desktop')
    .action(async (desktop: string, id: string, _o: unknown, cmd: Command) => {
      const { env: e, json } = env(cmd);
      const d = await usbDetach(e, desktop, id);
      printJsonOr(json, d, () => process.stdout.write(`detached ${d.vendorId}:${d.productId} from ${desktop}\n`));
    });
  usb.command('attached <desktop>').description('the USB devices now in the running desktop')
    .action(async (desktop: string, _o: unknown, cmd: Command) => {
      const { env: e, json } = env(cmd);
      const list = await usbAttached(e, desktop);
      printJsonOr(json, list, () => (list.length ? table(list.map((d) => ({ id: `${d.vendorId}:${d.productId}`, name: d.name ?? '-', since: d.at }))) : process.stdout.write('none\n')));
    });

  program.command('power <desktop> <action>').description(`a power event for the desktop, wherever it runs: ${POWER_ACTIONS.join('|')} (on this laptop all four; online: powerdown, reset)`)
    .action(async (desktop: string, action: string, _o: unknown, cmd: Command) => {
      if (!(POWER_ACTIONS as readonly string[]).includes(action)) throw new CarryonError('invalid', `power action must be one of ${POWER_ACTIONS.join(', ')}, not ${action}`);
      const { env: e, json } = env(cmd);
      const r = await powerDesktop(e, desktop, action as PowerAction);
      printJsonOr(json, r, () => process.stdout.write(`${r.desktop}: ${r.done}\n`));
    });
}
