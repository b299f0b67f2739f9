import { CarryonError } from '../core/errors.js';
import { GuestAgent } from './guest-agent.js';
import type { PowerAction } from './control.js';
import type { UsbQmp } from '../devices/usb-hotplug.js';

/** The VM as power events need it: QMP, and the guest agent's socket where it has one. */
export interface PowerTarget {
  qmp: UsbQmp;
  guestAgentSocket: string | null;
}

export interface PowerOptions {
  /** How long the guest agent may take to answer at all. */
  agentTimeoutMs?: number;
}

async function runState(qmp: UsbQmp): Promise<string> {
  const s = (await qmp.execute('query-status')) as { status?: unknown };
  return typeof s.status === 'string' ? s.status : 'unknown';
}

/**
 * A power event for a running guest, as `carryon power` and the host's own events send it.
 * powerdown: the ACPI power button (the guest decides). reset: a hard reset. suspend: its CPUs
 * are paused (stop). resume: they run again (cont; system_wakeup for a guest that suspended
 * itself), then the guest's clock is set through its agent where it answers. Answers what was
 * done, in words.
 */
export async function sendPower(vm: PowerTarget, action: PowerAction, opts: PowerOptions = {}): Promise<string> {
  const agentMs = opts.agentTimeoutMs ?? 2_000;
  if (action === 'powerdown') {
    await vm.qmp.execute('system_powerdown');
    return 'ACPI power button pressed: the guest shuts down if it listens for it';
  }
  if (action === 'reset') {
    await vm.qmp.execute('system_reset');
    return 'the guest was reset (as the reset button: unsaved work in it is lost)';
  }
  const state = await runState(vm.qmp);
  if (action === 'suspend') {
    if (state === 'suspended' || state === 'paused') return `the guest is already ${state}`;
    // Paused, not S3 (guest-suspend-ram): QEMU wakes a q35 guest from S3 through a machine reset
    // that leaves its ACPI registers dead (seen with SeaBIOS and Linux 6.1: no power button, and
    // its ACPI power-off no longer ends QEMU), so a desktop once suspended could not be shut down
    // cleanly again. Paused CPUs resume exactly where they were; only the clock needs setting.
    await vm.qmp.execute('stop');
    return 'the guest is paused (its CPUs are stopped until resume)';
  }
  // resume
  let done: string;
  if (state === 'suspended') {
    await vm.qmp.execute('system_wakeup');
    done = 'the guest woke from suspend';
  } else if (state === 'paused' || state === 'prelaunch') {
    await vm.qmp.execute('cont');
    done = 'the guest runs again';
  } else if (state === 'running') {
    done = 'the guest was running already';
  } else throw new CarryonError('wrong-state', `the guest is ${state}: it cannot be resumed`);
  // Its clock stood still (paused) or drifted (S3): the agent sets it, where it answers.
  const found = vm.guestAgentSocket ? await GuestAgent.tryConnect(vm.guestAgentSocket, agentMs) : { agent: null, reason: 'the VM has no guest agent channel' };
  if (!found.agent) return `${done}; its clock was not set (${found.reason ?? 'no guest agent'})`;
  try {
    await found.agent.setTime(new Date(), agentMs);
    return `${done}; its clock was set by its agent`;
  } catch (err) {
    return `${done}; its clock was not set (${(err as Error).message})`;
  } finally {
    found.agent.close();
  }
}

/**
 * Asks the guest's agent, where one answers, to power the guest down: said besides the ACPI
 * button when `run` stops the desktop. A guest that suspended itself to RAM (S3) and was woken no
 * longer hears its ACPI button (see `sendPower`), so the button alone would leave it running until
 * the forced stop; its agent still shuts it down in order (its file systems synced and unmounted).
 * Answers whether the agent took the request; never throws.
 */
export async function agentPowerdown(guestAgentSocket: string | null, timeoutMs = 2_000): Promise<boolean> {
  if (!guestAgentSocket) return false;
  const found = await GuestAgent.tryConnect(guestAgentSocket, timeoutMs).catch(() => ({ agent: null }));
  if (!found.agent) return false;
  try {
    await found.agent.shutdown('powerdown', timeoutMs);
    return true;
  } catch {
    return false;
  } finally {
    found.agent.close();
  }
}
