import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { createConnection } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { freePort } from './ports.js';

// A software TPM (Debian package swtpm) on 127.0.0.1 stands in for a laptop's TPM 2.0 chip;
// tpm2-tools reach it through TPM2TOOLS_TCTI exactly as they would reach /dev/tpmrm0.
export const swtpmSkip = ['/usr/bin/swtpm', '/usr/bin/tpm2_createprimary'].every((p) => existsSync(p))
  ? false
  : 'swtpm and tpm2-tools are not installed (Debian packages swtpm, tpm2-tools); .ci/run installs them';

const running: { child: ChildProcess; dir: string }[] = [];

export function stopTpms(): void {
  for (const t of running.splice(0)) {
    t.child.kill('SIGTERM');
    rmSync(t.dir, { recursive: true, force: true });
  }
}

const connects = (port: number) =>
  new Promise<boolean>((r) => {
    const s = createConnection({ host: '127.0.0.1', port }, () => { s.destroy(); r(true); });
    s.on('error', () => r(false));
  });

/**
 * Starts a fresh software TPM (its own state: another machine) and returns its TCTI string. Its
 * two ports are picked free but may be taken before swtpm binds them (tests run in parallel):
 * a swtpm that exits at start is tried again on other ports, so a TCTI never reaches another TPM.
 */
export async function startTpm(): Promise<string> {
  const state = mkdtempSync(join(tmpdir(), 'carryon-swtpm-'));
  for (let attempt = 0; attempt < 10; attempt++) {
    // The swtpm TCTI talks to the control channel on port + 1.
    const port = await freePort();
    const ctrl = port + 1;
    if (await connects(ctrl)) continue;
    const child = spawn('swtpm', ['socket', '--tpm2', '--tpmstate', `dir=${state}`, '--server', `type=tcp,port=${port},bindaddr=127.0.0.1`,
      '--ctrl', `type=tcp,port=${ctrl},bindaddr=127.0.0.1`, '--flags', 'not-need-init,startup-clear'], { stdio: 'ignore' });
    let exited = false;
    child.once('exit', () => (exited = true));
    running.push({ child, dir: state });
    for (let i = 0; i < 100 && !exited; i++) {
      if ((await connects(port)) && (await connects(ctrl))) break;
      await new Promise((r) => setTimeout(r, 50));
    }
    await new Promise((r) => setTimeout(r, 100));
    if (!exited) return `swtpm:host=127.0.0.1,port=${port}`;
  }
  throw new Error('swtpm did not start on free ports in 10 tries');
}
