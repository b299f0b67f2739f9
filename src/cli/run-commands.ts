import type { Command } from 'commander';
import { defaultHome } from '../client/vault/home.js';
import { specFor } from '../live/fill/holder.js';
import { socketDir } from '../live/disks/disks.js';
import { join } from 'node:path';
import { holdDesktop, serveDesktop } from '../client/ops/serve.js';
import type { HeldDesktop } from '../live/fill/holder.js';
import { startLiveControl } from '../live/live-holder.js';
import { startRunDevices } from '../client/devices/run-devices.js';
import { rememberLocalConfig } from '../client/vault/vault.js';
import { recordEvent } from '../live/disks/events.js';
import { stopReasonWords, takeStopReason } from '../client/devices/stop-reason.js';
import { GuestAgent } from '../live/guest-agent.js';
import { agentPowerdown } from '../live/power.js';
import { vmReplicaServer, type Quiesce } from '../live/live-chain.js';
import { quiesce } from '../live/quiesce.js';
import { CarryonError } from '../core/errors.js';
import { chainBlockdev } from '../disk/chain.js';
import { probeKvm, probeVirgl } from '../hypervisor/host.js';
import { runDesktop } from '../hypervisor/launch-desktop.js';
import { formatCommand, IPP_PORT, parseDisplay, parseMonitors, parseOfflineConfig, PRINTER_ADDRESS, type OfflineConfig, type RunningDesktop } from '../hypervisor/launch.js';
import { RELAY_SCRIPT } from '../devices/print-relay.js';
import { POLICY } from '../client/vault/guards.js';
import { existsSync } from 'node:fs';
import { passwordSource, printJsonOr } from './common.js';
import { parseRate, RateLimiter } from '../transfer-client/rate-limit.js';

interface GlobalOpts { home?: string; user?: string; passwordFile?: string; json?: boolean; limitRate?: string }

function env(cmd: Command) {
  const o = cmd.optsWithGlobals<GlobalOpts>();
  return { env: { home: o.home ?? defaultHome(), user: o.user ?? process.env.CARRYON_USER, password: passwordSource(o), log: (l: string) => process.stderr.write(`${l}\n`), rateLimit: o.limitRate ? new RateLimiter(parseRate(o.limitRate)) : undefined }, json: Boolean(o.json) };
}

/** How long a guest has to power off after the ACPI button (Ctrl-C, SIGTERM, the agent's lock, wipe or lease expiry) before QEMU is stopped. */
const POWEROFF_GRACE_MS = process.env.NODE_ENV === 'test' && Number(process.env.CARRYON_TEST_POWEROFF_GRACE_MS) > 0 ? Number(process.env.CARRYON_TEST_POWEROFF_GRACE_MS) : 60_000;

/** The guest's way to the laptop's printers (printing allowed, a user network, a CUPS socket here), or none. */
function printPath(config: OfflineConfig, policyFile: string, log: (l: string) => void): string[] | undefined {
  if (config.printing !== true || config.nic !== 'user') return undefined;
  const cups = process.env.CUPS_SERVER?.startsWith('/') ? process.env.CUPS_SERVER : '/run/cups/cups.sock';
  if (!existsSync(cups)) {
    log(`printing is allowed, but there is no CUPS socket at ${cups}: the desktop gets no printer`);
    return undefined;
  }
  log(`printing: the desktop's printer is ipp://${PRINTER_ADDRESS}:${IPP_PORT}/ (this laptop's CUPS)`);
  return [process.execPath, RELAY_SCRIPT, policyFile, cups];
}

/** virgl only where a window can show it and a probe (not a file's existence) shows GL working. */
async function decideGl(when: 'auto' | 'on' | 'off', display: string, log: (l: string) => void): Promise<boolean> {
  if (when === 'off') return false;
  const windowed = ['gtk', 'sdl', 'spice-app'].includes(parseDisplay(display));
  if (!windowed) {
    if (when === 'on') throw new CarryonError('invalid', `--gl on needs a window (--display gtk, sdl or spice-app), not ${display}`);
    return false;
  }
  const probe = await probeVirgl();
  if (!probe.ok && when === 'on') throw new CarryonError('no-gl', `3D (virgl) does not work here: ${probe.why}`);
  if (!probe.ok) log(`3D (virgl) is not available (${probe.why}): 2D display`);
  return probe.ok;
}

function untilSignal(): Promise<void> {
  return new Promise((resolve) => {
    process.once('SIGINT', resolve);
    process.once('SIGTERM', resolve);
  });
}

/** A headless box has no window system for gtk or sdl: default to none there and say so. */
function defaultDisplay(): string | undefined {
  return process.env.DISPLAY || process.env.WAYLAND_DISPLAY ? undefined : 'none';
}

interface RunOpts { dryRun?: boolean; display?: string; monitors?: string; gl: string; accel?: string; serial?: string; qemuArg: string[] }

export function registerRunCommands(program: Command): void {
  program.command('serve <desktop>').description('serve the desktop disks over NBD on a private unix socket (for qemu-img, nbdcopy, other hypervisors)')
    .action(async (desktop: string, _o: unknown, cmd: Command) => {
      const { env: e, json } = env(cmd);
      const served = await serveDesktop(e, desktop);
      const uris = served.disks.map((d) => `nbd+unix:///${d.name}?socket=${served.socketPath}`);
      printJsonOr(json, { socket: served.socketPath, uris }, () => process.stdout.write(`serving ${served.name}:\n${uris.map((u) => `  ${u}`).join('\n')}\n`));
      await Promise.race([untilSignal(), served.stopRequested]);
      await served.close();
    });

  program.command('run <desktop>').description('run the desktop offline under QEMU, which opens its encrypted disk chain itself')
    .option('--dry-run', 'print the QEMU command line and exit')
    .option('--display <kind>', 'gtk, sdl, spice-app, vnc (a private unix socket) or none; remembered for this desktop (default: gtk with a window system, else none)')
    .option('--monitors <n>', 'guest monitors (virtio-gpu outputs), remembered for this desktop (default 1)')
    .option('--gl <when>', '3D (virgl): auto (when a probe shows a working GL stack and there is a window), on, off', 'auto')
    .option('--accel <kind>', 'kvm or tcg (default: kvm when a probe shows it really runs guests, else tcg)')
    .option('--serial <where>', 'guest serial console: stdio or a file path')
    .option('--qemu-arg <arg>', 'extra QEMU argument, repeatable (e.g. --qemu-arg=-kernel --qemu-arg=/boot/vmlinuz)', (v: string, all: string[]) => [...all, v], [] as string[])
    .action(async (desktop: string, o: RunOpts, cmd: Command) => {
      const { env: e, json } = env(cmd);
      if (o.accel && o.accel !== 'kvm' && o.accel !== 'tcg') throw new CarryonError('invalid', `--accel must be kvm or tcg, not ${o.accel}`);
      // Flags checked before any key derivation or disk opens.
      if (o.display !== undefined) parseDisplay(o.display);
      const monitorsFlag = o.monitors !== undefined ? parseMonitors(o.monitors) : undefined;
      if (!['auto', 'on', 'off'].includes(o.gl)) throw new CarryonError('invalid', `--gl must be auto, on or off, not ${o.gl}`);
      let accel = o.accel as 'kvm' | 'tcg' | undefined;
      if (accel === 'kvm' || accel === undefined) {
        const kvm = await probeKvm();
        if (!kvm.ok && accel === 'kvm') throw new CarryonError('no-kvm', `KVM does not work here (${kvm.why}); use --accel tcg`);
        if (!kvm.ok) e.log(`KVM is not usable (${kvm.why}): running with TCG (slow)`);
        accel = kvm.ok ? 'kvm' : 'tcg';
      }
      // holdDesktop refuses a locked or wiped desktop and an expired lease before any disk opens.
      const held = await holdDesktop(e, desktop, 'run', { dryRun: o.dryRun });
      let vm: RunningDesktop | undefined;
      let signals = 0;
      let stopping: Promise<void> | null = null;
      const stop = () => {
        signals++;
        if (!vm) return;
        if (signals === 1) {
          const v = vm;
          stopping = (async () => {
            // The agent says why it stopped us (lease, lock, wipe); a plain signal is the user's.
            const reason = await takeStopReason(held.vault, held.state.desktopId);
            e.log(`${reason ? `${stopReasonWords(reason)}: ` : ''}shutting the desktop down (ACPI; forced after ${POWEROFF_GRACE_MS / 1000} s)${reason ? '' : '; press Ctrl-C again to force'}`);
            // Its agent is asked too: a guest deaf to the button (no acpid, or woken from S3) still shuts down in order (live/power.ts).
            const asked = agentPowerdown(v.guestAgentSocket);
            await v.stop(POWEROFF_GRACE_MS);
            await asked;
            const how = v.stoppedBy === 'acpi' ? 'the guest powered off cleanly' : `the guest did not power off within ${POWEROFF_GRACE_MS / 1000} s: QEMU was stopped (${v.stoppedBy ?? 'quit'})`;
            e.log(how);
            await recordEvent(e.home, 'power-off', held.state.desktopId, `${stopReasonWords(reason)}: ${how}`);
          })().catch((err: unknown) => void e.log(`stopping the desktop: ${(err as Error).message}`));
        } else vm.kill();
      };
      process.on('SIGINT', stop);
      process.on('SIGTERM', stop);
      const stopFill = new AbortController();
      let filling: Promise<void> = Promise.resolve();
      let control: Promise<{ close(): Promise<void> } | null> = Promise.resolve(null);
      try {
        const config = parseOfflineConfig(held.state.config);
        const local = held.state.localConfig as { display?: string; monitors?: unknown };
        const display = o.display ?? local.display ?? defaultDisplay() ?? 'gtk';
        // A remembered monitor count is for a display that shows them: a headless run (none) has one.
        const monitors = monitorsFlag ?? (typeof local.monitors === 'number' && parseDisplay(display) !== 'none' ? parseMonitors(local.monitors) : 1);
        // What the user chose is kept for this desktop's next runs (presentation only: local-config.json).
        if (!o.dryRun && (o.display !== undefined || monitorsFlag !== undefined)) {
          await rememberLocalConfig(held.vault.desktopDir(held.state.desktopId), { ...(o.display !== undefined ? { display: o.display } : {}), ...(monitorsFlag !== undefined ? { monitors: monitorsFlag } : {}) });
        }
        const vmSockets = join(await socketDir(held.vault, held.state.desktopId), 'vm');
        const printRelay = printPath(config, join(held.vault.desktopDir(held.state.desktopId), POLICY), e.log);
        const gl = await decideGl(o.gl as 'auto' | 'on' | 'off', display, e.log);
        const disks = held.disks.map((d, i) => {
          const spec = specFor(d, i, held.remote?.socketPath ?? null);
          return { name: d.name, blockdev: chainBlockdev(spec), secretId: spec.secretId, secret: d.chain.secret, baseSecretId: spec.baseSecretId, baseSecret: d.chain.baseSecret };
        });
        const result = await runDesktop({
          name: held.state.name.replace(/[^A-Za-z0-9._-]/g, '_').slice(0, 64) || 'desktop',
          disks, config, printRelay, display: parseDisplay(display) === 'vnc' ? 'none' : display, vnc: parseDisplay(display) === 'vnc', monitors, gl, accel, serial: o.serial, extraArgs: o.qemuArg,
          socketDir: vmSockets,
          dryRun: o.dryRun,
          onStarted: (v) => {
            vm = v;
            if (parseDisplay(display) === 'vnc') e.log(`the desktop's screen: VNC on ${join(vmSockets, 'vnc.sock')} (a unix socket only this user can open)`);
            if (signals > 0) stop();
            control = startRunControl(held, v, e.home, e.log).catch((err: unknown) => {
              e.log(`live replicas are not available for this run: ${(err as Error).message}`);
              return null;
            });
            filling = held.fillIn({ qmp: v.connection }, stopFill.signal);
            // A base found damaged pauses the guest (nothing more is read from it); the user then quits.
            filling = filling.then(() => held.checkBases(stopFill.signal, () => v.connection.execute('stop').then(() => undefined, () => undefined)));
          },
        });
        if (o.dryRun) {
          printJsonOr(json, { argv: result.argv }, () => process.stdout.write(`${formatCommand(result.argv)}\n`));
          return;
        }
        e.log(`QEMU exited (${result.exitCode}); the desktop's writes are in its encrypted top layer`);
        if (result.exitCode !== 0) process.exitCode = 1;
      } finally {
        await (await control)?.close();
        stopFill.abort();
        await filling;
        process.off('SIGINT', stop);
        process.off('SIGTERM', stop);
        await stopping;
        await held.release();
      }
    });
}

/** The run's control socket: live replicas inside the VM's own QEMU, and shutdown on request (a check-in of the running desktop). */
async function startRunControl(held: HeldDesktop, vm: RunningDesktop, home: string, log: (l: string) => void) {
  // USB by policy and power events first: the devices listed in local-config.json go in as QEMU starts.
  const devices = await startRunDevices(held, { qmp: vm.connection, guestAgentSocket: vm.guestAgentSocket }, { home, log });
  const dir = await socketDir(held.vault, held.state.desktopId);
  const nbd = vmReplicaServer((c, a) => vm.qmp(c, a), join(dir, 'replica.sock'));
  // The guest's agent, where it answers, freezes its file systems around the point in time.
  // QEMU's channel takes one client at a time: connected per replica, let go after.
  let agentAnswered: boolean | null = null;
  const quiesceGuest: Quiesce = async (pointInTime) => {
    const found = vm.guestAgentSocket ? await GuestAgent.tryConnect(vm.guestAgentSocket, 2_000) : { agent: null, reason: 'the VM has no guest agent channel' };
    try {
      const q = await quiesce(found.agent, pointInTime, { onProblem: log });
      agentAnswered = q.kind === 'quiesced';
      if (!q.thawed) log('WARNING: the guest agent did not confirm the thaw: the guest\'s file systems may still be frozen (`virsh`-style: run `fsfreeze -u` in the guest, or reboot it)');
      return { result: q.result, kind: q.kind, reason: q.reason ?? found.reason };
    } finally {
      found.agent?.close();
    }
  };
  const control = await startLiveControl(held, { qmp: vm.connection }, {
    kind: 'run', nbd, guestAgent: () => agentAnswered, quiesce: quiesceGuest, log, devices: devices.handler,
    async shutdown(graceMs, force) {
      log('shutting the desktop down (ACPI), as a check-in asked');
      await vm.qmp('system_powerdown').catch(() => undefined);
      const off = await Promise.race([vm.exited.then(() => true), new Promise<false>((r) => setTimeout(() => r(false), graceMs).unref())]);
      if (off) return;
      if (!force) throw new CarryonError('guest-still-running', `the guest did not shut down within ${Math.round(graceMs / 1000)} s: shut it down from inside, or check in with --force (cuts its power: writes it has not flushed are lost)`);
      log('the guest did not shut down in time: cutting its power (--force)');
      // QMP quit, not a kill: QEMU flushes its block layer, so nothing the guest wrote to its disk is lost.
      await vm.qmp('quit').catch(() => undefined);
      await vm.exited;
    },
  }).catch((err: unknown) => {
    devices.close();
    throw err;
  });
  return {
    live: control.live,
    async close() {
      devices.close();
      await control.close();
    },
  };
}
