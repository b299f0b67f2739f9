import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { createConnection } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, test } from 'node:test';
import { chooseSecretStorage, createDeviceKeys, loadDevice, type DeviceFile } from '../../src/client/home.js';
import { TPM_PRIVATE, TPM_PUBLIC, TpmError } from '../../src/client/tpm.js';
import { freePort } from '../support/ports.js';

// A software TPM (Debian package swtpm) on 127.0.0.1 stands in for a laptop's TPM 2.0 chip;
// tpm2-tools reach it through TPM2TOOLS_TCTI exactly as they would reach /dev/tpmrm0.
const skip = ['/usr/bin/swtpm', '/usr/bin/tpm2_createprimary'].every((p) => existsSync(p))
  ? false
  : 'swtpm and tpm2-tools are not installed (Debian packages swtpm, tpm2-tools); .ci/run installs them';

const dirs: string[] = [];
const tpms: ChildProcess[] = [];
after(() => {
  for (const t of tpms) t.kill('SIGTERM');
  for (const d of dirs) rmSync(d, { recursive: true, force: true });
  delete process.env.TPM2TOOLS_TCTI;
});

function tmp(): string {
  const d = mkdtempSync(join(tmpdir(), 'carryon-tpm-test-'));
  dirs.push(d);
  return d;
}

/** Starts a fresh software TPM (its own state: another machine) and returns its TCTI string. */
async function startTpm(): Promise<string> {
  const state = tmp();
  // The swtpm TCTI talks to the control channel on port + 1.
  const port = await freePort();
  const ctrl = port + 1;
  const child = spawn('swtpm', ['socket', '--tpm2', '--tpmstate', `dir=${state}`, '--server', `type=tcp,port=${port},bindaddr=127.0.0.1`,
    '--ctrl', `type=tcp,port=${ctrl},bindaddr=127.0.0.1`, '--flags', 'not-need-init,startup-clear'], { stdio: 'ignore' });
  tpms.push(child);
  for (let i = 0; i < 100; i++) {
    const up = await new Promise<boolean>((r) => {
      const s = createConnection({ host: '127.0.0.1', port }, () => { s.destroy(); r(true); });
      s.on('error', () => r(false));
    });
    if (up) break;
    await new Promise((r) => setTimeout(r, 50));
  }
  return `swtpm:host=127.0.0.1,port=${port}`;
}

function enrolledHome(home: string, storage: 'tpm' | 'file'): void {
  const info: DeviceFile = { deviceId: 'dev-1', name: 'laptop', brokerUrl: 'https://127.0.0.1:1', fingerprint: 'a'.repeat(64), signingPublicKey: 'x', secretStorage: storage };
  writeFileSync(join(home, 'device.json'), JSON.stringify(info));
}

test('device secret sealed by the TPM: never on disk in the clear, unsealed only by that TPM', { skip }, async () => {
  process.env.TPM2TOOLS_TCTI = await startTpm();
  const home = join(tmp(), 'home');
  assert.equal(chooseSecretStorage('auto'), 'tpm', 'auto picks the TPM when one is reachable');
  const { secretStorage } = await createDeviceKeys(home, 'tpm');
  assert.equal(secretStorage, 'tpm');
  assert.equal(existsSync(join(home, 'device.secret')), false, 'no plaintext secret file');
  assert.ok(existsSync(join(home, TPM_PUBLIC)) && existsSync(join(home, TPM_PRIVATE)));
  enrolledHome(home, 'tpm');
  const first = await loadDevice(home);
  const second = await loadDevice(home);
  assert.equal(first.secret.length, 32);
  assert.ok(first.secret.equals(second.secret), 'the same secret every time');

  // The same home on another machine (another TPM) does not yield the secret.
  process.env.TPM2TOOLS_TCTI = await startTpm();
  await assert.rejects(loadDevice(home), (e: unknown) => e instanceof TpmError && /another machine/.test(e.message));

  // A damaged sealed object is refused clearly too.
  rmSync(join(home, TPM_PRIVATE));
  await assert.rejects(loadDevice(home), (e: unknown) => e instanceof TpmError && /missing/.test(e.message));
});

test('without a TPM: auto falls back to a 0600 file; asking for tpm is a clear error', async () => {
  const saved = process.env.TPM2TOOLS_TCTI;
  delete process.env.TPM2TOOLS_TCTI;
  try {
    if (existsSync('/dev/tpmrm0')) return; // a real TPM here: nothing to fall back from
    assert.equal(chooseSecretStorage('auto'), 'file');
    assert.throws(() => chooseSecretStorage('tpm'), TpmError);
    const home = join(tmp(), 'home');
    mkdirSync(home);
    await createDeviceKeys(home, 'file');
    enrolledHome(home, 'file');
    assert.equal((await loadDevice(home)).secret.length, 32);
  } finally {
    if (saved) process.env.TPM2TOOLS_TCTI = saved;
  }
});
