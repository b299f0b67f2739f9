#!/usr/bin/env -S GLIBC_TUNABLES=glibc.malloc.hugetlb=1 node --max-semi-space-size=32 --heap-growing-percent=200
// The environment and flags: see core/runtime/node-flags.ts (keep the two in step).
import { Command } from 'commander';
import { z } from 'zod';
import { registerServerCommands } from './server-commands.js';
import { registerTransferCommands } from './transfer-commands.js';
import { registerHostCommands } from './host-commands.js';
import { registerClientCommands } from './client-commands.js';
import { registerRunCommands } from './run-commands.js';
import { registerDeviceCommands } from './device-commands.js';
import { CarryonError } from '../core/errors.js';
import { PACKAGE_VERSION } from '../core/version.js';
import { traceSpan, traceValue } from '../files/trace.js';

// Node's start and the static imports: the time before this line runs (CARRYON_TRACE=1 only).
traceSpan('start+modules', 0);
process.once('exit', () => {
  traceSpan('total', 0);
  const cpu = process.cpuUsage();
  traceValue('cpu', (cpu.user + cpu.system) / 1000);
});

// `carryon status | head -2`: the reader went away, so there is nobody left to tell; end quietly
// as a C tool killed by SIGPIPE would, instead of an unhandled 'error' event's stack trace.
process.stdout.on('error', (err: NodeJS.ErrnoException) => {
  if (err.code !== 'EPIPE') throw err;
  process.exit(process.exitCode ?? 0);
});

// zod compiles each object schema into a function on its first parse (`new Function`), which pays
// off over thousands of parses: a one-shot command parses each schema a few times, and compiling
// cost ≈ 10 ms of every start. The long-running processes keep it.
const LONG_RUNNING = new Set(['server', 'transfer-server', 'agent', 'serve', 'run', 'host']);

const program = new Command();
program.hook('preAction', (_program, action) => {
  let top: Command = action;
  while (top.parent && top.parent !== program) top = top.parent;
  if (!LONG_RUNNING.has(top.name())) z.config({ jitless: true });
});
program.name('carryon').description('Offline desktops: check out, run offline, check in.').version(PACKAGE_VERSION);
program.showHelpAfterError();

// Each area owns its own commands; the order matters only where one extends another's command.
registerServerCommands(program);
registerTransferCommands(program);
registerHostCommands(program);
registerClientCommands(program);
registerRunCommands(program);
registerDeviceCommands(program);

program.parseAsync(process.argv).catch((err: unknown) => {
  const message = err instanceof Error ? err.message : String(err);
  const code = err instanceof CarryonError ? ` [${err.code}]` : '';
  process.stderr.write(`carryon: ${message}${code}\n`);
  process.exitCode = process.exitCode && process.exitCode !== 0 ? process.exitCode : 1;
});
