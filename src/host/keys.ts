import { createHash, hkdfSync, randomBytes } from 'node:crypto';
import { lstat, mkdir, readFile, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { CarryonError } from '../core/errors.js';
import type { Chain } from '../disk/chain.js';
import { chainFiles } from '../disk/chain.js';
import { readLayout } from './layout.js';

/**
 * A desktop host's own secret (`host.key` in its data dir, 0600, made at first start): the LUKS
 * passphrases of every chain it keeps derive from it. No user password, lease or vault: the host
 * is a datacenter machine, and what protects its chains at rest is that file's access.
 */
export async function loadOrCreateHostKey(dataDir: string): Promise<Buffer> {
  const path = join(dataDir, 'host.key');
  try {
    const key = await readFile(path);
    if (key.length !== 32) throw new CarryonError('bad-config', `${path} must hold 32 bytes (it has ${key.length})`);
    return key;
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err;
  }
  await writeFile(path, randomBytes(32), { mode: 0o600, flag: 'wx' });
  return readFile(path);
}

/** Where a desktop's disk lives on the host: `<dataDir>/desktops/<desktopId>/<disk>/`. */
export function hostDiskDir(dataDir: string, desktopId: string, disk: string): string {
  return join(dataDir, 'desktops', desktopId, disk);
}

/** A disk's chain with one passphrase per layer, derived from the host key for this desktop and disk; the top is the one its layout names (layout.ts). */
export function hostChain(hostKey: Buffer, dataDir: string, desktopId: string, disk: string): Chain {
  const secret = (layer: 'base' | 'top') => Buffer.from(hkdfSync('sha256', hostKey, Buffer.from(desktopId), `carryon-host-chain:${disk}:${layer}`, 32)).toString('base64');
  const dir = hostDiskDir(dataDir, desktopId, disk);
  return { files: chainFiles(dir, readLayout(dir).top), secret: secret('top'), baseSecret: secret('base') };
}

/**
 * A private directory for a desktop's QMP socket: a short path (unix sockets stop at 108 bytes) in
 * the temp directory, 0700 and ours (checked, so nobody else can pre-create it).
 */
export async function hostSocketDir(dataDir: string, desktopId: string): Promise<string> {
  const uid = process.getuid?.() ?? 0;
  const parent = join(tmpdir(), `carryon-host-${uid}`);
  const dir = join(parent, createHash('sha256').update(`${dataDir}\0${desktopId}`).digest('hex').slice(0, 16));
  for (const d of [parent, dir]) {
    await mkdir(d, { recursive: true, mode: 0o700 });
    const st = await lstat(d);
    if (!st.isDirectory() || st.uid !== uid || (st.mode & 0o077) !== 0) throw new CarryonError('unsafe-socket-dir', `${d} is not a private directory of this user: remove it and start again`);
  }
  return dir;
}
