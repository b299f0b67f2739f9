// carryon-test: serial (swtpm flaked when another heavy file shared the 2 cores)
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, test } from 'node:test';
import { chooseSecretStorage, createDeviceKeys, loadDevice, type DeviceFile } from '../../src/client/vault/home.js';
import { createHmac, randomBytes } from 'node:crypto';
import { newTpmPolicy, sealToTpm, TPM_KEY_PRIVATE, TPM_KEY_PUBLIC, TPM_PRIVATE, TPM_PUBLIC, tpmAuthValue, TpmError, unsealFromTpm } from '../../src/client/vault/tpm.js';
import { startTpm, stopTpms, swtpmSkip } from '../support/swtpm.js';

// A software TPM (Debian package swtpm) on 127.0.0.1 stands in for a laptop's TPM 2.0 chip;
// tpm2-tools reach it through TPM2TOOLS_TCTI exactly as they would reach /dev/tpmrm0.
const skip = swtpmSkip;

const dirs: string[] = [];
after(() => {
  stopTpms();
  for (const d of dirs) rmSync(d, { recursive: true, force: true });
  delete process.env.TPM2TOOLS_TCTI;
});

function tmp(): string {
  const d = mkdtempSync(join(tmpdir(), 'carryon-tpm-test-'));
  dirs.push(d);
  return d;
}

function enrolledHome(home: string, storage: 'tpm' | 'file'): void {
  const info: DeviceFile = { deviceId: 'dev-1', name: 'laptop', brokerUrl: 'https://127.0.0.1:1', fingerprint: 'a'.repeat(64), signingPublicKey: 'x', secretStorage: storage };
  writeFileSync(join(home, 'device.json'), JSON.stringify(info));
}

test('device secret sealed by the TPM: never on disk in the clear, unsealed only by that TPM', { skip }, async () => {
  process.env.TPM2TOOLS_TCTI = await startTpm();
  const home = join(tmp(), 'home');
  assert.equal(chooseSecretStorage('auto'), 'tpm', 'auto picks the TPM when one is reachable');
  const { secretStorage } = await createDeviceKeys(home, 'tpm', 'pw');
  assert.equal(secretStorage, 'tpm');
  assert.equal(existsSync(join(home, 'device.secret')), false, 'no plaintext secret file');
  assert.equal(existsSync(join(home, 'device.key')), false, 'no plaintext device key (the agent identity)');
  assert.ok([TPM_PUBLIC, TPM_PRIVATE, TPM_KEY_PUBLIC, TPM_KEY_PRIVATE].every((f) => existsSync(join(home, f))));
  enrolledHome(home, 'tpm');
  const first = await loadDevice(home);
  const second = await loadDevice(home);
  assert.equal(first.publicKeyB64, second.publicKeyB64, 'the same sealed device key every time');
  const secret = await first.secret('pw');
  assert.equal(secret.length, 32);
  assert.ok(secret.equals(await second.secret('pw')), 'the same secret every time');

  // The password is the sealed secret's authorization value: a wrong one is refused by the TPM.
  await assert.rejects(first.secret('not-the-password'), (e: unknown) => e instanceof TpmError && /wrong password/.test(e.message));

  // Another boot state (PCR 7 extended, as another OS or a changed Secure Boot would) unseals nothing.
  const tcti = process.env.TPM2TOOLS_TCTI;
  execFileSync('tpm2_pcrextend', [`7:sha256=${'01'.repeat(32)}`]);
  await assert.rejects(first.secret('pw'), (e: unknown) => e instanceof TpmError && /PCR|measured boot/.test(e.message));
  await assert.rejects(loadDevice(home), TpmError, 'the device key is bound to the boot state too');

  // The same home on another machine (another TPM) does not yield the secret or the key.
  process.env.TPM2TOOLS_TCTI = await startTpm();
  await assert.rejects(loadDevice(home), (e: unknown) => e instanceof TpmError && /another machine/.test(e.message));
  process.env.TPM2TOOLS_TCTI = tcti;

  // A damaged sealed object is refused clearly too.
  rmSync(join(home, TPM_PRIVATE));
  await assert.rejects(first.secret('pw'), (e: unknown) => e instanceof TpmError && /missing/.test(e.message));
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
    await createDeviceKeys(home, 'file', 'pw');
    enrolledHome(home, 'file');
    assert.equal((await (await loadDevice(home)).secret('pw')).length, 32);
  } finally {
    if (saved) process.env.TPM2TOOLS_TCTI = saved;
  }
});

test('the auth value never holds a zero byte (tpm2-tools cut one short), and homes sealed before keep theirs', () => {
  for (let i = 0; i < 2000; i++) {
    const policy = newTpmPolicy({});
    const auth = tpmAuthValue(policy, `password ${i}`);
    assert.equal(auth.length, 32, 'the most a SHA-256 object\'s auth may hold');
    assert.equal(auth.indexOf(0), -1);
  }
  const old = { pcrs: 'sha256:7', authSalt: randomBytes(16).toString('base64'), authEncoding: 'raw' as const };
  assert.deepEqual(tpmAuthValue(old, 'pw'), createHmac('sha256', Buffer.from(old.authSalt, 'base64')).update('pw').digest());
});

test('a password whose salted HMAC holds a zero byte still unseals', { skip }, async () => {
  process.env.TPM2TOOLS_TCTI = await startTpm();
  // A salt for which the 32-byte HMAC of the password has a zero byte in the middle (≈ 1 in 8).
  let salt = '';
  for (let i = 0; !salt; i++) {
    const s = randomBytes(16).toString('base64');
    const mac = createHmac('sha256', Buffer.from(s, 'base64')).update('pw').digest();
    if (mac.subarray(0, 31).includes(0)) salt = s;
  }
  const home = join(tmp(), 'zero-home');
  mkdirSync(home, { recursive: true });
  const secret = randomBytes(32);
  await sealToTpm(home, secret, 'pw', undefined, { ...newTpmPolicy({}), authSalt: salt });
  assert.ok((await unsealFromTpm(home, 'pw')).equals(secret));
});
