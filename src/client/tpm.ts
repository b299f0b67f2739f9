import { execFile } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { CarryonError } from '../core/errors.js';
import { writeFileAtomic } from '../store/files.js';

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
      const why = (stderr.toString().trim().split('\n').pop() ?? '') || err.message;
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

/** Seals `secret` to this TPM; writes the sealed object's blobs into `home`. */
export async function sealToTpm(home: string, secret: Buffer): Promise<void> {
  await withScratch(async (dir, flush) => {
    const parent = await primary(dir, flush);
    const pub = join(dir, 'seal.pub');
    const priv = join(dir, 'seal.priv');
    await tool('tpm2_create', ['-Q', '-C', parent, '-i', '-', '-u', pub, '-r', priv], secret);
    await flush();
    await writeFileAtomic(join(home, TPM_PUBLIC), await readFile(pub));
    await writeFileAtomic(join(home, TPM_PRIVATE), await readFile(priv));
  });
}

/** The device secret, unsealed by this TPM; another TPM (another laptop) refuses. */
export async function unsealFromTpm(home: string): Promise<Buffer> {
  for (const f of [TPM_PUBLIC, TPM_PRIVATE]) {
    if (!existsSync(join(home, f))) throw new TpmError(`${join(home, f)} is missing: the device secret cannot be unsealed`);
  }
  return withScratch(async (dir, flush) => {
    const parent = await primary(dir, flush);
    const obj = join(dir, 'seal.ctx');
    try {
      await tool('tpm2_load', ['-Q', '-C', parent, '-u', join(home, TPM_PUBLIC), '-r', join(home, TPM_PRIVATE), '-c', obj]);
    } catch (err) {
      throw new TpmError(`this TPM cannot load the sealed device secret (the client home belongs to another machine?): ${(err as Error).message}`);
    }
    await flush();
    const secret = await tool('tpm2_unseal', ['-c', obj]);
    if (secret.length !== 32) throw new TpmError(`the TPM returned ${secret.length} bytes, expected a 32-byte device secret`);
    return secret;
  });
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
