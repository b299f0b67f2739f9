import { mkdir, readFile, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { randomBytes } from 'node:crypto';
import { z } from 'zod';
import type { ChunkId } from '../core/chunk-id.js';
import { CarryonError, EnvelopeError } from '../core/errors.js';
import { deriveDeviceUserKey, unwrapLineageKeys, wrapLineageKeys, type LineageKeys } from '../core/keys.js';
import { SignedLease, verifyLease, type LeasePayload } from '../core/lease.js';
import { decodeManifest, type Manifest } from '../core/manifest.js';
import { publicKeyFromBase64 } from '../core/signing.js';
import { VaultDisk } from '../disk/vault-disk.js';
import { openChunkStore } from '../store/open-store.js';
import type { ChunkStore } from '../store/chunk-store.js';
import { readJson, type DeviceIdentity } from './home.js';
import { writeFileAtomic } from '../store/files.js';

export const DesktopState = z.object({
  desktopId: z.string(),
  name: z.string(),
  user: z.string(),
  checkoutId: z.string(),
  state: z.enum(['transferring', 'checked_out', 'checking_in']),
  jobId: z.string().nullable(),
  keys: z.object({ salt: z.string(), wrapped: z.string(), N: z.number().int() }),
  lease: SignedLease,
  config: z.record(z.string(), z.unknown()),
  localConfig: z.record(z.string(), z.unknown()).default({}),
  disks: z.array(z.object({ name: z.string(), baseDigest: z.string() })),
  lastReplicationAt: z.string().nullable().default(null),
  locked: z.boolean().default(false),
});
export type DesktopState = z.infer<typeof DesktopState>;

const Clock = z.object({ lastSeen: z.string() });

/** Scrypt cost for the vault key; tests may lower it through the environment. */
export function vaultScryptN(): number {
  const n = Number(process.env.CARRYON_SCRYPT_N ?? 1 << 15);
  return Number.isInteger(n) && n >= 1024 ? n : 1 << 15;
}

/**
 * The laptop's vault: one chunk store of blobs exactly as received (encrypted at rest), and per
 * desktop a state file (wrapped keys, lease, manifests, config), replaced atomically.
 */
export class Vault {
  private constructor(readonly home: string, readonly store: ChunkStore) {}

  static async open(home: string): Promise<Vault> {
    await mkdir(join(home, 'desktops'), { recursive: true, mode: 0o700 });
    return new Vault(home, await openChunkStore(join(home, 'chunks')));
  }

  desktopDir(desktopId: string): string {
    if (!/^[A-Za-z0-9-]{1,64}$/.test(desktopId)) throw new CarryonError('invalid', `bad desktop id ${desktopId}`);
    return join(this.home, 'desktops', desktopId);
  }

  async list(): Promise<DesktopState[]> {
    const { readdir } = await import('node:fs/promises');
    const out: DesktopState[] = [];
    for (const id of await readdir(join(this.home, 'desktops'))) {
      const s = await readJson(join(this.home, 'desktops', id, 'state.json'), DesktopState);
      if (s) out.push(s);
    }
    return out;
  }

  /** Finds a desktop held in this vault by name or id. */
  async find(ref: string): Promise<DesktopState> {
    const all = await this.list();
    const hit = all.find((s) => s.desktopId === ref || s.name === ref) ?? (ref === '' && all.length === 1 ? all[0] : undefined);
    if (!hit) throw new CarryonError('not-held', `desktop ${ref || '(none given)'} is not checked out to this device`);
    return hit;
  }

  async save(state: DesktopState): Promise<void> {
    const dir = this.desktopDir(state.desktopId);
    await mkdir(dir, { recursive: true, mode: 0o700 });
    await writeFileAtomic(join(dir, 'state.json'), JSON.stringify(DesktopState.parse(state)));
  }

  async remove(desktopId: string): Promise<void> {
    await rm(this.desktopDir(desktopId), { recursive: true, force: true });
  }

  /** Wraps lineage keys for this device and user: scrypt(device secret ‖ password). */
  static async wrapKeys(device: DeviceIdentity, password: string, keys: LineageKeys, desktopId: string): Promise<DesktopState['keys']> {
    const salt = randomBytes(16);
    const N = vaultScryptN();
    const k = await deriveDeviceUserKey(device.secret, password, salt, { N, r: 8, p: 1, maxmem: 128 * 1024 * 1024 });
    return { salt: salt.toString('base64'), wrapped: wrapLineageKeys(k, keys, `vault:${desktopId}`).toString('base64'), N };
  }

  static async unwrapKeys(device: DeviceIdentity, password: string, state: DesktopState): Promise<LineageKeys> {
    const k = await deriveDeviceUserKey(device.secret, password, Buffer.from(state.keys.salt, 'base64'), { N: state.keys.N, r: 8, p: 1, maxmem: 128 * 1024 * 1024 });
    try {
      return unwrapLineageKeys(k, Buffer.from(state.keys.wrapped, 'base64'), `vault:${state.desktopId}`);
    } catch (err) {
      if (err instanceof EnvelopeError) throw new CarryonError('vault-locked', 'the vault does not open: wrong password, or this vault belongs to another device');
      throw err;
    }
  }

  /** Trusted time: never earlier than the latest time this vault has seen (no clock rollback). */
  async trustedNow(): Promise<Date> {
    const clock = await readJson(join(this.home, 'clock.json'), Clock);
    const now = new Date();
    const last = clock ? new Date(clock.lastSeen) : now;
    const t = last > now ? last : now;
    // The stored time is only a lower bound: not moving it (a full disk, or less than a minute
    // since the last write) can never extend a lease, so a write failure must not block the user.
    if (!clock || t.getTime() - last.getTime() >= 60_000) {
      await writeFileAtomic(join(this.home, 'clock.json'), JSON.stringify({ lastSeen: t.toISOString() })).catch((err: NodeJS.ErrnoException) => {
        if (err.code !== 'ENOSPC') throw err;
      });
    }
    return t;
  }

  /** Offline open: the password unwraps the keys and the lease must verify and be unexpired. */
  async unlock(device: DeviceIdentity, password: string, state: DesktopState): Promise<{ keys: LineageKeys; lease: LeasePayload }> {
    if (state.locked) throw new CarryonError('desktop-locked', `${state.name} is locked by the administrator or by lease expiry; connect to the broker`);
    const keys = await Vault.unwrapKeys(device, password, state);
    const lease = verifyLease(state.lease, publicKeyFromBase64(device.info.signingPublicKey), { now: await this.trustedNow(), deviceId: device.info.deviceId!, desktopId: state.desktopId });
    return { keys, lease };
  }

  async baseManifest(digest: string): Promise<Manifest> {
    const raw = await this.store.getManifest(digest);
    if (!raw) throw new CarryonError('bad-state', `base manifest ${digest} is missing from the vault`);
    return decodeManifest(raw);
  }

  /** `readOnly` for looking only (status): nothing is written, so it works on a full disk too. */
  async openDisks(state: DesktopState, keys: LineageKeys, fetchChunk?: (id: ChunkId, index: number) => Promise<void>, opts: { readOnly?: boolean } = {}): Promise<{ name: string; disk: VaultDisk }[]> {
    const out: { name: string; disk: VaultDisk }[] = [];
    for (const d of state.disks) {
      const base = await this.baseManifest(d.baseDigest);
      out.push({ name: d.name, disk: await VaultDisk.open({ stateDir: join(this.desktopDir(state.desktopId), 'disks', d.name), store: this.store, keys, base, fetchChunk, autoFlushMs: 0, readOnly: opts.readOnly }) });
    }
    return out;
  }

  async sizeBytes(): Promise<number> {
    return (await this.store.stats()).bytes;
  }

  async readLocalConfig(desktopId: string): Promise<Record<string, unknown>> {
    try {
      return JSON.parse(await readFile(join(this.desktopDir(desktopId), 'local-config.json'), 'utf8')) as Record<string, unknown>;
    } catch {
      return {};
    }
  }
}
