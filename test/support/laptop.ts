import { spawn } from 'node:child_process';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { closeSync, openSync, readSync, statSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { measureLayer } from '../../src/disk/layer-shape.js';
import type { ClientEnv } from '../../src/client/ops.js';
import { serveDesktop } from '../../src/client/ops/serve.js';
import { readClock, writeClock } from '../../src/client/vault/guards.js';
import { loadDevice } from '../../src/client/vault/home.js';
import { Vault } from '../../src/client/vault/vault.js';
import { NbdClient } from '../../src/nbd/client.js';

/** Writes into a checked-out desktop through `carryon serve`'s NBD export, as a VM would. */
export async function writeDesktop(env: ClientEnv, ref: string, writes: { offset: number; data: Buffer }[], disk = 'disk0'): Promise<void> {
  const served = await serveDesktop(env, ref);
  try {
    const c = await NbdClient.connect(served.socketPath, disk);
    for (const w of writes) await c.write(w.offset, w.data);
    await c.flush();
    await c.close();
  } finally {
    await served.close();
  }
}

/** Moves a desktop's trusted clock record ahead by `ms` (as if that much time had passed), MACed as the vault writes it. */
export async function moveTrustedClock(home: string, ref: string, ms: number, password = 'alice-password'): Promise<void> {
  const vault = await Vault.open(home);
  const { keys, state } = await vault.openKeys(await loadDevice(home), password, await vault.find(ref));
  const dir = vault.desktopDir(state.desktopId);
  const { agentAt } = await readClock(dir, keys, state.desktopId, state.name);
  await writeClock(dir, keys, state.desktopId, { lastSeen: new Date(Date.now() + ms).toISOString(), tpm: null, agentAt });
}

/** The laptop's current disk contents, in plaintext, read through `carryon serve` as a VM would. */
export async function readDesktop(env: ClientEnv, ref: string, disk = 'disk0'): Promise<Buffer> {
  const served = await serveDesktop(env, ref);
  try {
    const c = await NbdClient.connect(served.socketPath, disk);
    const parts: Buffer[] = [];
    for (let off = 0; off < c.size; off += 16 << 20) parts.push(await c.read(off, Math.min(16 << 20, c.size - off)));
    await c.close();
    return Buffer.concat(parts);
  } finally {
    await served.close();
  }
}

/** Runs the `carryon` CLI as alice on `home` in a process of its own: its exit code and all it printed. */
export function runCarryon(home: string, args: string[], extraEnv: Record<string, string> = {}): Promise<{ code: number | null; out: string }> {
  return new Promise((resolve) => {
    const child = spawn(process.execPath, [join(process.cwd(), 'dist', 'src', 'cli', 'carryon.cjs'), ...args], {
      env: { ...process.env, ...extraEnv, CARRYON_HOME: home, CARRYON_USER: 'alice', CARRYON_PASSWORD: 'alice-password' }, stdio: ['ignore', 'pipe', 'pipe'],
    });
    let out = '';
    child.stdout.on('data', (d: Buffer) => { out += d.toString(); });
    child.stderr.on('data', (d: Buffer) => { out += d.toString(); });
    child.once('exit', (code) => resolve({ code, out }));
  });
}

/** Overwrites 4 KiB of one data cluster of a qcow2 base with random bytes, its structure left as it was. */
export async function rewriteDataCluster(file: string, chunk = 256 * 1024): Promise<void> {
  const shape = await measureLayer(file, { withoutLuks: true });
  const size = statSync(file).size;
  for (let at = size - chunk + 4096; at > 0; at -= chunk) {
    const fd = openSync(file, 'r+');
    const was = Buffer.alloc(4096);
    readSync(fd, was, 0, 4096, at);
    writeSync(fd, randomBytes(4096), 0, 4096, at);
    closeSync(fd);
    if ((await measureLayer(file, { withoutLuks: true })).sha256 === shape.sha256) return;
    const back = openSync(file, 'r+');
    writeSync(back, was, 0, 4096, at);
    closeSync(back);
  }
  assert.fail('no data cluster found');
}
