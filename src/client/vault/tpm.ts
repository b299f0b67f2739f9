import { execFile } from 'node:child_process';
import { createHmac, randomBytes } from 'node:crypto';
import { existsSync } from 'node:fs';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { z } from 'zod';
import { CarryonError } from '../../core/errors.js';
import { writeFileAtomic } from '../../files/atomic.js';

/**
 * Device secret sealed by the TPM through tpm2-tools: the secret becomes a sealed-data object
 * under the owner hierarchy's primary key (re-derived from the TPM's seed on every use, never
 * stored). Its public/private blobs live in the client home, but only this TPM can load them, so
 * a copied home cannot produce the secret. The TPM is reached through the tools' usual TCTI
 * (TPM2TOOLS_TCTI, e.g. "device:/dev/tpmrm0" or "swtpm:port=2321"), default the kernel's
 * resource manager.
 */
export const TPM_PUBLIC = 'device.secret.tpm-pub';
export const TPM_PRIVATE = 'device.secret.tpm-priv';

export class TpmError extends CarryonError {
  constructor(message: string) {
    super('tpm', message);
  }
}

/** A TPM is usable: a device node or a configured TCTI, and tpm2-tools installed. */
export function tpmAvailable(env: NodeJS.ProcessEnv = process.env): boolean {
  const reachable = Boolean(env.TPM2TOOLS_TCTI) || existsSync('/dev/tpmrm0');
  return reachable && ['/usr/bin/tpm2_createprimary', '/usr/local/bin/tpm2_createprimary'].some((p) => existsSync(p));
}

function tool(name: string, args: string[], input?: Buffer): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const child = execFile(name, args, { encoding: 'buffer', timeout: 30_000, maxBuffer: 1 << 20 }, (err, stdout, stderr) => {
      if (!err) return resolve(stdout);
      // The TPM's own reason is on an earlier line than the tools' closing "Unable to run".
      const lines = stderr.toString().trim().split('\n').filter((l) => /ERROR/.test(l) && !/Unable to run/.test(l));
      const why = lines.map((l) => l.replace(/^.*ERROR:\s*/, '')).join('; ') || stderr.toString().trim().split('\n').pop() || err.message;
      reject(new TpmError((err as NodeJS.ErrnoException).code === 'ENOENT' ? `${name} is not installed (Debian package tpm2-tools)` : `${name} failed: ${why}`));
    });
    child.stdin?.end(input);
  });
}

/**
 * Runs `steps` with a private scratch directory for TPM context files. Transient objects are
 * flushed after every step: without a resource manager (swtpm, a raw /dev/tpm0) they would
 * otherwise stay loaded and exhaust the TPM's few object slots.
 */
async function withScratch<T>(steps: (dir: string, flush: () => Promise<void>) => Promise<T>): Promise<T> {
  const dir = await mkdtemp(join(tmpdir(), 'carryon-tpm-'));
  const flush = async () => void (await tool('tpm2_flushcontext', ['-t']));
  try {
    return await steps(dir, flush);
  } finally {
    await flush().catch(() => undefined);
    await rm(dir, { recursive: true, force: true });
  }
}

async function primary(dir: string, flush: () => Promise<void>): Promise<string> {
  const ctx = join(dir, 'primary.ctx');
  await tool('tpm2_createprimary', ['-Q', '-C', 'o', '-c', ctx]);
  await flush();
  return ctx;
}

/** Which PCRs the sealed objects are bound to, and the salt of the authorization value. */
export const TPM_POLICY = 'device.tpm.json';
export const TPM_KEY_PUBLIC = 'device.key.tpm-pub';
export const TPM_KEY_PRIVATE = 'device.key.tpm-priv';
const PolicyFile = z.object({
  pcrs: z.string().regex(/^sha(1|256|384):\d{1,2}(,\d{1,2})*$/),
  authSalt: z.string(),
  // "text": the auth value has no zero byte (see tpmAuthValue); homes sealed before it have none ("raw").
  authEncoding: z.enum(['raw', 'text']).default('raw'),
});
export type TpmPolicy = z.infer<typeof PolicyFile>;

/**
 * PCR 7 (Secure Boot state and keys) by default: another OS, a disabled Secure Boot or another
 * signing key changes it, a kernel update does not. CARRYON_TPM_PCRS (e.g. "sha256:0,2,4,7") binds more.
 */
export function newTpmPolicy(env: NodeJS.ProcessEnv = process.env): TpmPolicy {
  return PolicyFile.parse({ pcrs: env.CARRYON_TPM_PCRS ?? 'sha256:7', authSalt: randomBytes(16).toString('base64'), authEncoding: 'text' });
}

export async function readTpmPolicy(home: string): Promise<TpmPolicy | null> {
  try {
    return PolicyFile.parse(JSON.parse(await readFile(join(home, TPM_POLICY), 'utf8')));
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return null;
    throw new TpmError(`${join(home, TPM_POLICY)} is damaged: ${(err as Error).message.split('\n')[0]}`);
  }
}

/**
 * The sealed device secret's authorization value: the user's password, salted. The TPM checks it
 * and counts failures (dictionary-attack lockout), so guessing the password needs this TPM and
 * goes at the TPM's pace, even for root on the running laptop.
 */
export function tpmAuthValue(policy: TpmPolicy, password: string): Buffer {
  const mac = createHmac('sha256', Buffer.from(policy.authSalt, 'base64')).update(password, 'utf8').digest();
  // A binary value with a zero byte never unsealed (sealed from a file, presented inline as
  // "hex:" on unseal, which tpm2-tools evidently read only up to that byte): about 1 home in 8.
  // As text (base64url of 192 bits: 32 bytes, the most a SHA-256 object's auth may hold) the
  // value has no zero byte.
  return policy.authEncoding === 'text' ? Buffer.from(mac.subarray(0, 24).toString('base64url'), 'latin1') : mac;
}

/** Runs the policy commands on `session`: the PCR values now, plus the authorization value when asked. */
async function applyPolicy(session: string, policy: TpmPolicy, withAuth: boolean, out?: string): Promise<void> {
  await tool('tpm2_policypcr', ['-Q', '-S', session, '-l', policy.pcrs, ...(out && !withAuth ? ['-L', out] : [])]);
  if (withAuth) await tool('tpm2_policyauthvalue', ['-Q', '-S', session, ...(out ? ['-L', out] : [])]);
}

/**
 * Seals `data` (at most 128 bytes) under this TPM's owner primary, usable only through a policy
 * session that proves the PCRs (and, with `auth`, the authorization value): no userWithAuth.
 */
async function seal(home: string, names: [string, string], data: Buffer, policy: TpmPolicy, auth: Buffer | null): Promise<void> {
  await withScratch(async (dir, flush) => {
    const parent = await primary(dir, flush);
    const trial = join(dir, 'trial.ctx');
    const digest = join(dir, 'policy.dat');
    await tool('tpm2_startauthsession', ['-Q', '-S', trial]);
    try {
      await applyPolicy(trial, policy, auth !== null, digest);
    } finally {
      await tool('tpm2_flushcontext', [trial]).catch(() => undefined);
    }
    const pub = join(dir, 'seal.pub');
    const priv = join(dir, 'seal.priv');
    const args = ['-Q', '-C', parent, '-L', digest, '-a', 'fixedtpm|fixedparent|adminwithpolicy', '-i', '-', '-u', pub, '-r', priv];
    if (auth) {
      await writeFile(join(dir, 'auth'), auth, { mode: 0o600 });
      args.push('-p', `file:${join(dir, 'auth')}`);
    }
    await tool('tpm2_create', args, data);
    await flush();
    await writeFileAtomic(join(home, names[0]), await readFile(pub));
    await writeFileAtomic(join(home, names[1]), await readFile(priv));
  });
}

async function unseal(home: string, names: [string, string], policy: TpmPolicy | null, auth: Buffer | null, what: string): Promise<Buffer> {
  for (const f of names) {
    if (!existsSync(join(home, f))) throw new TpmError(`${join(home, f)} is missing: the ${what} cannot be unsealed`);
  }
  return withScratch(async (dir, flush) => {
    const parent = await primary(dir, flush);
    const obj = join(dir, 'seal.ctx');
    try {
      await tool('tpm2_load', ['-Q', '-C', parent, '-u', join(home, names[0]), '-r', join(home, names[1]), '-c', obj]);
    } catch (err) {
      throw new TpmError(`this TPM cannot load the sealed ${what} (the client home belongs to another machine?): ${(err as Error).message}`);
    }
    await flush();
    // Homes sealed before PCR policies (no device.tpm.json) unseal as they were made.
    if (!policy) return tool('tpm2_unseal', ['-c', obj]);
    const session = join(dir, 'session.ctx');
    await tool('tpm2_startauthsession', ['-Q', '--policy-session', '-S', session]);
    try {
      await applyPolicy(session, policy, auth !== null);
      // tpm2-tools read a session's companion auth only inline ("+file:" is not honoured there), so it
      // is in argv for the few milliseconds tpm2_unseal runs: a salted HMAC of the password, not the password.
      const authArg = `session:${session}${auth ? `+hex:${auth.toString('hex')}` : ''}`;
      return await tool('tpm2_unseal', ['-c', obj, '-p', authArg]);
    } catch (err) {
      const m = (err as Error).message;
      if (/HMAC check failed|authorization/i.test(m)) throw new TpmError(`the TPM refuses to unseal the ${what}: wrong password (the TPM counts failures and locks out after a few)`);
      if (/lockout/i.test(m)) throw new TpmError(`the TPM is in dictionary-attack lockout: wait, then try again with the right password`);
      if (/PCR|policy/i.test(m)) throw new TpmError(`the TPM refuses to unseal the ${what}: the measured boot state (PCRs ${policy.pcrs}) differs from enrolment (another OS, Secure Boot changed?)`);
      throw err;
    } finally {
      await tool('tpm2_flushcontext', [session]).catch(() => undefined);
    }
  });
}

/** Seals the device secret (PCR policy + the password as authorization value) and the device key (PCR policy). */
export async function sealToTpm(home: string, secret: Buffer, password: string, deviceKeyDer?: Buffer, policy: TpmPolicy = newTpmPolicy()): Promise<void> {
  await seal(home, [TPM_PUBLIC, TPM_PRIVATE], secret, policy, tpmAuthValue(policy, password));
  if (deviceKeyDer) await seal(home, [TPM_KEY_PUBLIC, TPM_KEY_PRIVATE], deviceKeyDer, policy, null);
  await writeFileAtomic(join(home, TPM_POLICY), JSON.stringify(policy));
}

/** The device secret, unsealed by this TPM with the password; another TPM (another laptop) refuses. */
export async function unsealFromTpm(home: string, password: string): Promise<Buffer> {
  const policy = await readTpmPolicy(home);
  const secret = await unseal(home, [TPM_PUBLIC, TPM_PRIVATE], policy, policy ? tpmAuthValue(policy, password) : null, 'device secret');
  if (secret.length !== 32) throw new TpmError(`the TPM returned ${secret.length} bytes, expected a 32-byte device secret`);
  return secret;
}

/** The device signing key (PKCS#8 DER), unsealed by this TPM in this boot state; the agent needs no password. */
export async function unsealDeviceKey(home: string): Promise<Buffer> {
  return unseal(home, [TPM_KEY_PUBLIC, TPM_KEY_PRIVATE], await readTpmPolicy(home), null, 'device key');
}

/**
 * The TPM's clock (milliseconds the TPM has run, kept in its NV memory; software can move it
 * forward only) and its reset count, or null without a usable TPM.
 */
export async function readTpmClock(env: NodeJS.ProcessEnv = process.env): Promise<{ clock: number; resetCount: number } | null> {
  if (!tpmAvailable(env)) return null;
  try {
    const out = (await tool('tpm2_readclock', [])).toString('utf8');
    const clock = /\bclock:\s*(\d+)/.exec(out)?.[1];
    const reset = /\breset_count:\s*(\d+)/.exec(out)?.[1];
    return clock && reset ? { clock: Number(clock), resetCount: Number(reset) } : null;
  } catch {
    return null;
  }
}
