import { watch, type FSWatcher } from 'node:fs';
import { z } from 'zod';
import { followHostSleep, logindSource } from '../../devices/host-sleep.js';
import { sendPower } from '../../live/power.js';
import { listHostUsb, usbTestSeams } from '../../devices/usb-host.js';
import { emulatedDevices, hostPassthrough, UsbHotplug, type AttachedUsb, type UsbQmp } from '../../devices/usb-hotplug.js';
import { parseUsbId } from '../../devices/usb-rules.js';
import type { AttachedUsbView, ControlHandler, PowerAction } from '../../live/control.js';
import { recordEvent } from '../../live/disks/events.js';
import { POLICY, usbRuleSets } from '../vault/guards.js';
import type { HeldDesktop } from '../../live/fill/holder.js';

const view = (a: AttachedUsb): AttachedUsbView => ({
  id: a.id, vendorId: a.device.vendorId, productId: a.device.productId, at: a.at,
  ...(a.device.product ? { name: [a.device.manufacturer, a.device.product].filter(Boolean).join(' ') } : {}),
});

/** How often the policy file is looked at besides the file-system watch (which may miss a rename on some file systems). */
const POLICY_POLL_MS = 5_000;

/**
 * The devices of a desktop `run` holds: USB hot-plug by policy (the check-out's rules and the
 * agent's, re-read at every decision; a policy change detaches at once what no longer passes)
 * and power events, both offered on the holder's control socket. Every attach, refusal and
 * detach goes to the offline events the agent reports at the next broker contact.
 */
export async function startRunDevices(held: HeldDesktop, vm: { qmp: UsbQmp; guestAgentSocket: string | null }, opts: { home: string; log: (l: string) => void }): Promise<{
  handler: Pick<ControlHandler, 'usb' | 'power'>;
  hotplug: UsbHotplug;
  close(): void;
}> {
  const dir = held.vault.desktopDir(held.state.desktopId);
  const seams = usbTestSeams();
  const hotplug = new UsbHotplug(vm.qmp, {
    rules: () => usbRuleSets(dir, held.state.config),
    devices: () => listHostUsb(seams.sysfs),
    record: (action, detail) => recordEvent(opts.home, action, held.state.desktopId, detail),
    log: opts.log,
    backend: seams.emulated ? emulatedDevices : hostPassthrough,
  });
  let closed = false;
  let enforcing = false;
  let again = false;
  const enforce = () => {
    if (closed) return;
    // A change while one is applied is applied after it, not dropped.
    if (enforcing) return void (again = true);
    enforcing = true;
    void hotplug.enforce()
      .catch((err: unknown) => opts.log(`applying the USB policy failed: ${(err as Error).message}`))
      .finally(() => {
        enforcing = false;
        if (again) {
          again = false;
          enforce();
        }
      });
  };
  // The agent writes policy.json when the broker's policy reaches it: applied at once.
  let watcher: FSWatcher | null = null;
  try {
    watcher = watch(dir, (_event, name) => {
      if (name === POLICY) enforce();
    });
    watcher.on('error', () => undefined);
  } catch {
    watcher = null; // the poll below still applies it
  }
  const poll = setInterval(enforce, POLICY_POLL_MS);
  poll.unref();
  // Devices the user listed in local-config.json go in now, each decided like a hand-made attach.
  const wanted = z.array(z.object({ vendorId: z.string(), productId: z.string() })).catch([]).parse((held.state.localConfig as { usbDevices?: unknown }).usbDevices ?? []);
  for (const w of wanted) {
    try {
      const id = parseUsbId(`${w.vendorId}:${w.productId}`);
      await hotplug.attach(id.vendorId, id.productId);
    } catch (err) {
      opts.log(`USB ${w.vendorId}:${w.productId} from local-config.json not attached: ${(err as Error).message}`);
    }
  }
  const power = async (action: PowerAction) => {
    const done = await sendPower(vm, action);
    await recordEvent(opts.home, 'power', held.state.desktopId, `${action}: ${done}`);
    opts.log(`power ${action}: ${done}`);
    return done;
  };
  // The host going to sleep suspends (or pauses) the guest first; after the wake it resumes with its clock set.
  const sleep = logindSource();
  if (sleep.source) void followHostSleep(sleep.source, { beforeSleep: async () => void (await power('suspend')), afterWake: async () => void (await power('resume')) }, opts.log);
  else opts.log(`host suspend is not passed to the guest: ${sleep.why}`);
  return {
    hotplug,
    handler: {
      usb: {
        attach: async (v, p) => view(await hotplug.attach(v, p)),
        detach: async (v, p) => view(await hotplug.detach(v, p)),
        list: async () => hotplug.attached().map(view),
      },
      power,
    },
    close() {
      closed = true;
      watcher?.close();
      sleep.source?.close();
      clearInterval(poll);
    },
  };
}
