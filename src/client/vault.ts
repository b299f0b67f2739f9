import { mkdir, readFile, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { randomBytes } from 'node:crypto';
import { z } from 'zod';
import { CarryonError, EnvelopeError } from '../core/errors.js';
import { deriveDeviceUserKey, unwrapLineageKeys, wrapLineageKeys, type LineageKeys } from '../core/keys.js';
import { SignedLease, verifyLease, type LeasePayload } from '../core/lease.js';
import { decodeManifest, encodeManifest, manifestDigest, type Manifest } from '../core/manifest.js';
import { publicKeyFromBase64 } from '../core/signing.js';
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
  /**
   * Per disk: the checkpoint its base layer holds, whether the base is complete (the check-out
   * filled it), and a merge of the top into the base that was begun and must be finished.
   */
  disks: z.array(z.object({ name: z.string().regex(/^[A-Za-z0-9._-]{1,64}$/), baseDigest: z.string().regex(/^[0-9a-f]{64}$/), complete: z.boolean().default(false), mergingTo: z.string().regex(/^[0-9a-f]{64}$/).nullable().default(null) })),
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
 * The laptop's vault: per desktop a state file (wrapped keys, lease, config, disks), replaced
 * atomically, the manifests of its checkpoints, and per disk a LUKS-encrypted qcow2 chain
 * (client/disks.ts). Chunks exist only on the wire: the live disk is QEMU's.
 */
export class Vault {
  private constructor(readonly home: string) {}

  static async open(home: string): Promise<Vault> {
    await mkdir(join(home, 'desktops'), { recursive: true, mode: 0o700 });
    return new Vault(home);
  }

  /** Nothing to release any more (kept so callers need not know). */
  async close(): Promise<void> {}

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

  async putManifest(desktopId: string, m: Manifest): Promise<string> {
    const digest = manifestDigest(m);
    const dir = join(this.desktopDir(desktopId), 'manifests');
    await mkdir(dir, { recursive: true, mode: 0o700 });
    await writeFileAtomic(join(dir, digest), encodeManifest(m));
    return digest;
  }

  /** A checkpoint manifest, checked against the digest that names it. */
  async manifest(desktopId: string, digest: string): Promise<Manifest> {
    if (!/^[0-9a-f]{64}$/.test(digest)) throw new CarryonError('bad-state', `bad manifest digest ${digest}`);
    let raw: Buffer;
    try {
      raw = await readFile(join(this.desktopDir(desktopId), 'manifests', digest));
    } catch {
      throw new CarryonError('bad-state', `manifest ${digest.slice(0, 12)}… of desktop ${desktopId} is missing from the vault`);
    }
    const m = decodeManifest(raw);
    if (manifestDigest(m) !== digest) throw new CarryonError('bad-state', `manifest ${digest.slice(0, 12)}… of desktop ${desktopId} is damaged`);
    return m;
  }

  async sizeBytes(): Promise<number> {
    const { execFile } = await import('node:child_process');
    return new Promise((resolve) => execFile('du', ['-sb', join(this.home, 'desktops')], (err, out) => resolve(err ? 0 : Number(out.split('\t')[0]) || 0)));
  }

  async readLocalConfig(desktopId: string): Promise<Record<string, unknown>> {
    try {
      return JSON.parse(await readFile(join(this.desktopDir(desktopId), 'local-config.json'), 'utf8')) as Record<string, unknown>;
    } catch {
      return {};
    }
  }
}
