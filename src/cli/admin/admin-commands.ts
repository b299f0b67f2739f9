import type { Command } from 'commander';
import { registerDesktopCommands } from './admin-desktops.js';
import { registerDirectoryCommands } from './admin-directory.js';
import { registerOpsCommands } from './admin-ops.js';
import { registerHostAdminCommands } from './admin-hosts.js';
import { registerGatewayCommands } from './admin-gateway.js';

/**
 * `carryon admin …`: every action of the web console, over the same API. Human output is an
 * aligned table with units (MiB, MB/s, "3 h ago"); `--json` prints the broker's answer unchanged.
 */
export function registerAdminCommands(program: Command): void {
  const admin = program.command('admin').description('administer a broker over its API (the web console at the broker URL does the same)')
    .option('--url <url>', 'broker URL, or several brokers comma-separated (env CARRYON_URL)')
    .option('--fingerprint <sha256>', 'pinned broker certificate fingerprint, one per URL comma-separated (env CARRYON_FINGERPRINT)')
    .option('--user <name>', 'admin user (env CARRYON_USER)')
    .option('--password-file <file>', 'read the password from a file (else CARRYON_PASSWORD or a prompt)')
    .option('--json', 'machine-readable output');
  registerDirectoryCommands(admin);
  registerDesktopCommands(admin);
  registerOpsCommands(admin);
  registerHostAdminCommands(admin);
  registerGatewayCommands(admin);
}
