import { join } from 'node:path';
import type { Command } from 'commander';
import { defaultHome } from '../client/home.js';
import { serveDesktop } from '../client/serve.js';
import { runDesktop } from '../hypervisor/launch-desktop.js';
import { formatCommand, parseOfflineConfig, type RunningDesktop } from '../hypervisor/launch.js';
import { passwordSource, printJsonOr } from './common.js';

interface GlobalOpts { home?: string; user?: string; passwordFile?: string; json?: boolean }

function env(cmd: Command) {
  const o = cmd.optsWithGlobals<GlobalOpts>();
  return { env: { home: o.home ?? defaultHome(), user: o.user ?? process.env.CARRYON_USER, password: passwordSource(o), log: (l: string) => process.stderr.write(`${l}\n`) }, json: Boolean(o.json) };
}

function untilSignal(): Promise<void> {
  return new Promise((resolve) => {
    process.once('SIGINT', resolve);
    process.once('SIGTERM', resolve);
  });
}

export function registerRunCommands(program: Command): void {
  program.command('serve <desktop>').description('serve the desktop disks over NBD on a private unix socket (for QEMU, qemu-img, nbdcopy)')
    .action(async (desktop: string, _o: unknown, cmd: Command) => {
      const { env: e, json } = env(cmd);
      const served = await serveDesktop(e, desktop);
      const uris = served.disks.map((d) => `nbd+unix:///${d.name}?socket=${served.socketPath}`);
      printJsonOr(json, { socket: served.socketPath, uris }, () => process.stdout.write(`serving ${served.name}:\n${uris.map((u) => `  ${u}`).join('\n')}\n`));
      await untilSignal();
      await served.close();
    });

  program.command('run <desktop>').description('run the desktop offline under QEMU (KVM when usable, else TCG), disks over NBD')
    .option('--dry-run', 'print the QEMU command line and exit')
    .option('--display <kind>', 'QEMU display, e.g. gtk, sdl, none (a local setting)')
    .action(async (desktop: string, o: { dryRun?: boolean; display?: string }, cmd: Command) => {
      const { env: e, json } = env(cmd);
      // serveDesktop refuses a locked/wiped vault and an expired lease before any disk opens.
      const served = await serveDesktop(e, desktop);
      try {
        const config = parseOfflineConfig(served.config);
        let vm: RunningDesktop | undefined;
        const stop = () => void vm?.stop(60_000);
        process.once('SIGINT', stop);
        process.once('SIGTERM', stop);
        const result = await runDesktop({
          name: served.name.replace(/[^A-Za-z0-9._-]/g, '_').slice(0, 64) || 'desktop',
          disks: served.disks.map((d) => ({ name: d.name, device: d.disk })),
          config,
          socketDir: join(served.socketPath, '..', 'vm'),
          existingNbdSocket: served.socketPath,
          dryRun: o.dryRun,
          display: o.display,
          onStarted: (v) => (vm = v),
        });
        if (o.dryRun) {
          printJsonOr(json, { argv: result.argv }, () => process.stdout.write(`${formatCommand(result.argv)}\n`));
          return;
        }
        process.stderr.write(`QEMU exited (${result.exitCode}); disks flushed and the dirty set recorded\n`);
      } finally {
        await served.close();
      }
    });
}
