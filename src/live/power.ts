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
  /** How long a guest that accepted a suspend may take to reach S3 before it is paused instead. */
  suspendWaitMs?: number;
  log?: (l: string) => void;
}

async function runState(qmp: UsbQmp): Promise<string> {
  const s = (await qmp.execute('query-status')) as { status?: unknown };
  return typeof s.status === 'string' ? s.status : 'unknown';
}

/**
 * A power event for a running guest, as `carryon power` and the host's own events send it.
 * powerdown: the ACPI power button (the guest decides). reset: a hard reset. suspend: the guest
 * suspends itself to RAM where its agent answers, else its CPUs are paused (stop). resume: the
 * opposite (system_wakeup or cont), then the guest's clock is set through its agent where it
 * answers. Answers what was done, in words.
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
    const found = vm.guestAgentSocket ? await GuestAgent.tryConnect(vm.guestAgentSocket, agentMs) : { agent: null, reason: 'the VM has no guest agent channel' };
    if (found.agent) {
      try {
        const suspended = vm.qmp.waitEvent((e) => e.event === 'SUSPEND', opts.suspendWaitMs ?? 30_000);
        suspended.catch(() => undefined);
        await found.agent.suspendRam(agentMs);
        await suspended;
        return 'the guest suspended itself to RAM (its agent answered)';
      } catch (err) {
        opts.log?.(`the guest's agent did not suspend it (${(err as Error).message}): pausing it instead`);
      } finally {
        found.agent.close();
      }
    }
    await vm.qmp.execute('stop');
    return `the guest is paused (its CPUs are stopped${found.agent ? '' : `; no guest agent: ${found.reason ?? 'it does not answer'}`})`;
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
