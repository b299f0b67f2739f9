import type { Command } from 'commander';
import { defaultHome } from '../client/vault/home.js';
import { specFor } from '../live/fill/holder.js';
import { socketDir } from '../live/disks/disks.js';
import { join } from 'node:path';
import { holdDesktop, serveDesktop } from '../client/ops/serve.js';
import type { HeldDesktop } from '../live/fill/holder.js';
import { startLiveControl } from '../live/live-holder.js';
import { GuestAgent } from '../live/guest-agent.js';
import type { Quiesce } from '../live/live-chain.js';
import { quiesce } from '../live/quiesce.js';
import { chmod, rm } from 'node:fs/promises';
import { CarryonError } from '../core/errors.js';
import { chainBlockdev } from '../disk/chain.js';
import { probeKvm } from '../hypervisor/host.js';
import { runDesktop } from '../hypervisor/launch-desktop.js';
import { formatCommand, parseOfflineConfig, type RunningDesktop } from '../hypervisor/launch.js';
import { passwordSource, printJsonOr } from './common.js';
import { parseRate, RateLimiter } from '../transfer-client/rate-limit.js';

interface GlobalOpts { home?: string; user?: string; passwordFile?: string; json?: boolean; limitRate?: string }

function env(cmd: Command) {
  const o = cmd.optsWithGlobals<GlobalOpts>();
  return { env: { home: o.home ?? defaultHome(), user: o.user ?? process.env.CARRYON_USER, password: passwordSource(o), log: (l: string) => process.stderr.write(`${l}\n`), rateLimit: o.limitRate ? new RateLimiter(parseRate(o.limitRate)) : undefined }, json: Boolean(o.json) };
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

interface RunOpts { dryRun?: boolean; display?: string; accel?: string; serial?: string; qemuArg: string[] }

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
    .option('--display <kind>', 'QEMU display, e.g. gtk, sdl, none (default: gtk with a window system, else none)')
    .option('--accel <kind>', 'kvm or tcg (default: kvm when a probe shows it really runs guests, else tcg)')
    .option('--serial <where>', 'guest serial console: stdio or a file path')
    .option('--qemu-arg <arg>', 'extra QEMU argument, repeatable (e.g. --qemu-arg=-kernel --qemu-arg=/boot/vmlinuz)', (v: string, all: string[]) => [...all, v], [] as string[])
    .action(async (desktop: string, o: RunOpts, cmd: Command) => {
      const { env: e, json } = env(cmd);
      if (o.accel && o.accel !== 'kvm' && o.accel !== 'tcg') throw new CarryonError('invalid', `--accel must be kvm or tcg, not ${o.accel}`);
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
      const stop = () => {
        signals++;
        if (!vm) return;
        if (signals === 1) {
          e.log('shutting the desktop down (ACPI); press Ctrl-C again to force');
          void vm.stop(60_000);
        } else vm.kill();
      };
      process.on('SIGINT', stop);
      process.on('SIGTERM', stop);
      const stopFill = new AbortController();
      let filling: Promise<void> = Promise.resolve();
      let control: Promise<{ close(): Promise<void> } | null> = Promise.resolve(null);
      try {
        const config = parseOfflineConfig(held.state.config);
        const display = o.display ?? (held.state.localConfig as { display?: string }).display ?? defaultDisplay();
        const disks = held.disks.map((d, i) => {
          const spec = specFor(d, i, held.remote?.socketPath ?? null);
          return { name: d.name, blockdev: chainBlockdev(spec), secretId: spec.secretId, secret: d.chain.secret, baseSecretId: spec.baseSecretId, baseSecret: d.chain.baseSecret };
        });
        const result = await runDesktop({
          name: held.state.name.replace(/[^A-Za-z0-9._-]/g, '_').slice(0, 64) || 'desktop',
          disks, config, display, accel, serial: o.serial, extraArgs: o.qemuArg,
          socketDir: join(await socketDir(held.vault, held.state.desktopId), 'vm'),
          dryRun: o.dryRun,
          onStarted: (v) => {
            vm = v;
            if (signals > 0) stop();
            control = startRunControl(held, v, e.log).catch((err: unknown) => {
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
        await held.release();
      }
    });
}

/** The run's control socket: live replicas inside the VM's own QEMU, and shutdown on request (a check-in of the running desktop). */
async function startRunControl(held: HeldDesktop, vm: RunningDesktop, log: (l: string) => void) {
  const dir = await socketDir(held.vault, held.state.desktopId);
  const replicaSocket = join(dir, 'replica.sock');
  let nbdStarted: Promise<void> | null = null;
  const ensureServer = () =>
    (nbdStarted ??= (async () => {
      await rm(replicaSocket, { force: true });
      await vm.qmp('nbd-server-start', { addr: { type: 'unix', data: { path: replicaSocket } } });
      await chmod(replicaSocket, 0o600);
    })());
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
  return startLiveControl(held, { qmp: vm.connection }, {
    kind: 'run', nbd: { socketPath: replicaSocket, ensureServer }, guestAgent: () => agentAnswered, quiesce: quiesceGuest, log,
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
  });
}
