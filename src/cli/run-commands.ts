import { join } from 'node:path';
import type { Command } from 'commander';
import { defaultHome } from '../client/home.js';
import { serveDesktop } from '../client/serve.js';
import { buildQemuCommand, kvmUsable, launchQemu, type OfflineConfig } from '../hypervisor/launch.js';
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

  program.command('run <desktop>').description('run the desktop offline under QEMU/KVM, disks over NBD')
    .option('--dry-run', 'print the QEMU command line and exit')
    .option('--display <kind>', 'QEMU display (kept as a local setting)', undefined)
    .action(async (desktop: string, o: { dryRun?: boolean; display?: string }, cmd: Command) => {
      const { env: e, json } = env(cmd);
      const served = await serveDesktop(e, desktop);
      try {
        const config = { ...(served.config as unknown as OfflineConfig), ...(o.display ? { display: o.display } : {}) };
        const argv = buildQemuCommand(config, served.disks.map((d) => ({ name: d.name, socketPath: served.socketPath })), {
          kvm: kvmUsable(), qmpSocket: join(served.socketPath, '..', 'qmp.sock'), name: served.name,
        });
        if (o.dryRun) {
          printJsonOr(json, { argv }, () => process.stdout.write(`${argv.map((a) => (/[\s,]/.test(a) ? `'${a}'` : a)).join(' ')}\n`));
          return;
        }
        const abort = new AbortController();
        process.once('SIGINT', () => abort.abort());
        process.once('SIGTERM', () => abort.abort());
        const code = await launchQemu(argv, abort.signal);
        process.stderr.write(`QEMU exited (${code}); disks flushed and the dirty set recorded\n`);
      } finally {
        await served.close();
      }
    });
}
