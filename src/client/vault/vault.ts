import { execFile } from 'node:child_process';
import { createPublicKey } from 'node:crypto';
import { mkdir, readdir, readFile, rename, rm, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { randomBytes } from 'node:crypto';
import { z } from 'zod';
import { CarryonError, EnvelopeError } from '../../core/errors.js';
import { SignedLease } from '../../core/tokens/lease.js';
import { decodeManifest, encodedDigest, encodeManifest, type Manifest } from '../../core/chunks/manifest.js';
import { eraseChainKeys } from '../../disk/chain.js';
import { openDesktopKeys, recordMac, recordMacOk, sealDesktopKeys, type DesktopKeys } from '../../live/disks/desktop-keys.js';
import { emptyTrash, isLockedByToken, LEASE, presentationOnly, shred, TOKEN } from './guards.js';
import type { DeviceIdentity } from './home.js';
import { readJsonFile } from '../../files/json-file.js';
import { checkStoredCost, deriveWrapKey, reusableWrapKey, vaultScryptN, type PendingWrapKey, type WrapKey } from './kdf.js';
import { findParked, listParked, parkedRefusal, sealParkedWrap } from './parked.js';
import { openOnlineWrap } from './online-unlock.js';
import { traced } from '../../files/trace.js';
import { writeFileAtomic } from '../../files/atomic.js';
import { DesktopState, type DesktopRecords } from '../../live/disks/state.js';

export { DesktopState };


/**
 * A wiped vault whose layer files take less than this on disk is removed by the wiping process
 * itself. Small: freeing a file costs per extent, and where the file system discards (ext4
 * `discard`, common on SSDs) each extent is trimmed before unlink returns — the top of a check-in
 * of 41 MiB in 64 KiB writes took 45–60 ms to unlink here (one of 16 writes ≈ 1 ms), more than
 * forking the remover (≈ 5 ms of this process's CPU).
 */
const REMOVE_HERE_BYTES = 4 * 1024 * 1024;

/** Bytes the files in `dirs` take on disk (a missing one: none). */
async function bytesOnDisk(dirs: string[]): Promise<number> {
  let total = 0;
  for (const d of dirs) {
    for (const f of await readdir(d).catch(() => [] as string[])) total += await stat(join(d, f)).then((s) => s.blocks * 512, () => 0);
  }
  return total;
}

/** state.json: the state as text and its MAC under the vault key (so manifests' digests and disk state are authenticated). */
const StateFile = z.object({ v: z.literal(2), body: z.string(), mac: z.string() });

export { vaultScryptN };

/**
 * The laptop's vault: per desktop a MACed state file (wrapped keys, lease, config, disks),
 * replaced atomically, the manifests of its checkpoints (named by digest; the MACed state pins
 * the digests), the policy files of guards.ts, and per disk a LUKS-encrypted qcow2 chain
 * (client/disks.ts).
 */
/** `state` with the password's wrap (and the parked copy's, made with it) of `from`. */
function withWrapOf(state: DesktopState, from: DesktopState['keys']): DesktopState {
  return { ...state, keys: { ...state.keys, wrapped: from.wrapped, ...(from.park ? { park: from.park } : {}) } };
}

export class Vault implements DesktopRecords {
  private constructor(readonly home: string) {}

  static async open(home: string): Promise<Vault> {
    await mkdir(join(home, 'desktops'), { recursive: true, mode: 0o700 });
    // Erased desktops whose removal a kill interrupted.
    if ((await readdir(join(home, 'trash')).catch(() => [])).length) emptyTrash(join(home, 'trash'));
    return new Vault(home);
  }

  /** Nothing to release any more (kept so callers need not know). */
  async close(): Promise<void> {}

  desktopDir(desktopId: string): string {
    if (!/^[A-Za-z0-9-]{1,64}$/.test(desktopId)) throw new CarryonError('invalid', `bad desktop id ${desktopId}`);
    return join(this.home, 'desktops', desktopId);
  }

  /** The state as stored, not yet authenticated (enough to list and report; keys come only through openKeys). */
  private async readState(desktopId: string): Promise<{ state: DesktopState; body: string; mac: string } | null> {
    const path = join(this.desktopDir(desktopId), 'state.json');
    const file = await readJsonFile(path, StateFile, { missing: null });
    if (!file) return null;
    try {
      return { state: DesktopState.parse(JSON.parse(file.body)), body: file.body, mac: file.mac };
    } catch (err) {
      throw new CarryonError('bad-state', `${path} is damaged or was written by an older Carryon: ${(err as Error).message.split('\n')[0]}`);
    }
  }

  async list(): Promise<DesktopState[]> {
    const out: DesktopState[] = [];
    for (const id of await readdir(join(this.home, 'desktops'))) {
      const s = await this.readState(id);
      if (s) out.push(s.state);
    }
    return out;
  }

  /** Finds a desktop held in this vault by name or id. */
  async find(ref: string): Promise<DesktopState> {
    const all = await this.list();
    const hit = all.find((s) => s.desktopId === ref || s.name === ref) ?? (ref === '' && all.length === 1 ? all[0] : undefined);
    if (!hit) {
      // A parked copy (kept after a check-in, rollback or cancel) is not a checked-out desktop: say so, and what to do.
      const parked = ref ? await findParked(this.home, ref) : null;
      if (parked) throw parkedRefusal(parked.name);
      throw new CarryonError('not-held', `desktop ${ref || '(none given)'} is not checked out to this device`);
    }
    return hit;
  }

  async save(state: DesktopState, keys: DesktopKeys): Promise<void> {
    const dir = this.desktopDir(state.desktopId);
    await mkdir(dir, { recursive: true, mode: 0o700 });
    // A state read before the check-out's password wrap was added (addPasswordWrap) keeps it.
    if (!state.keys.wrapped) state = await this.withStoredWrap(state, keys);
    const body = JSON.stringify(DesktopState.parse(state));
    await writeFileAtomic(join(dir, 'state.json'), JSON.stringify({ v: 2, body, mac: recordMac(keys, state.desktopId, 'state', body) }));
  }

  /** Adds the password's wrap (its KDF run beside the transfer: kdf.ts `startWrapKey`) to the state as stored now. */
  async addPasswordWrap(device: DeviceIdentity, password: string, desktopId: string, keys: DesktopKeys, pending: PendingWrapKey): Promise<void> {
    const wrap = await Vault.wrapKeys(device, password, keys, desktopId, await pending.key);
    const stored = await this.authenticState(desktopId, keys);
    if (!stored) throw new CarryonError('not-held', `desktop ${desktopId} is not checked out to this device`);
    if (stored.keys.salt !== wrap.salt || !wrap.wrapped) throw new Error('the password wrap was made for another salt');
    await this.save(withWrapOf(stored, wrap), keys);
  }

  private async withStoredWrap(state: DesktopState, keys: DesktopKeys): Promise<DesktopState> {
    const held = (await this.authenticState(state.desktopId, keys).catch(() => null))?.keys;
    return held?.wrapped && held.salt === state.keys.salt ? withWrapOf(state, held) : state;
  }

  /** The stored state, MAC-checked under `keys`; null when there is none. */
  private async authenticState(desktopId: string, keys: DesktopKeys): Promise<DesktopState | null> {
    const stored = await this.readState(desktopId);
    if (!stored) return null;
    if (!recordMacOk(keys, desktopId, 'state', stored.body, stored.mac)) throw new CarryonError('state-tampered', `the state of ${stored.state.name} was altered outside Carryon`);
    return stored.state;
  }

  /**
   * Crypto-erase (every removal: wipe, check-in, rollback, discard): the unlock token, the wrapped
   * keys (and the salt the LUKS secrets derive from) and the LUKS headers of every chain are
   * overwritten before the files go, so nothing left behind (an undeleted block) decrypts again.
   */
  async wipe(desktopId: string): Promise<void> {
    const dir = this.desktopDir(desktopId);
    const disks = await readdir(join(dir, 'disks')).catch(() => [] as string[]);
    // Independent files, each erased and synced on its own: side by side.
    await Promise.all([shred(join(dir, TOKEN)), shred(join(dir, 'state.json')), ...disks.map((d) => eraseChainKeys(join(dir, 'disks', d)))]);
    // What is left is ciphertext no key opens. Unlinking a multi-GiB qcow2 takes ext4 most of a
    // second (measured: 0.8 s for 2 GiB in 2048 extents), so it leaves the vault at once (a
    // rename) and its blocks are freed by a process of its own; a leftover is swept next time.
    const layerBytes = await bytesOnDisk(disks.map((d) => join(dir, 'disks', d)));
    const trash = join(this.home, 'trash');
    await mkdir(trash, { recursive: true, mode: 0o700 });
    const aside = join(trash, `${desktopId}.${Date.now()}.${randomBytes(4).toString('hex')}`);
    try {
      await rename(dir, aside);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return;
      await rm(dir, { recursive: true, force: true });
      return;
    }
    // Little left (a parked check-in took the bases away; its tops hold the change): removed here,
    // which costs less than starting the process (≈ 5 ms of this one's CPU to fork it).
    if (layerBytes < REMOVE_HERE_BYTES) await rm(aside, { recursive: true, force: true });
    else emptyTrash(trash);
  }

  /**
   * Wraps a desktop's keys for this device and user: scrypt(device secret ‖ password). `salt`: a
   * fresh one, or one chosen ahead by a caller that derives the layers' secrets from it meanwhile,
   * or the key a parked copy was just opened with (kdf.ts), reused where its cost is today's.
   */
  static async wrapKeys(device: DeviceIdentity, password: string, keys: DesktopKeys, desktopId: string, salt: Buffer | WrapKey | null = null): Promise<DesktopState['keys']> {
    const held = salt && !Buffer.isBuffer(salt) ? reusableWrapKey(salt) : null;
    const wk = held ?? await deriveWrapKey(device, password, Buffer.isBuffer(salt) ? salt : randomBytes(16), vaultScryptN());
    return {
      salt: wk.salt.toString('base64'), wrapped: sealDesktopKeys(wk.key, keys, desktopId).toString('base64'), N: wk.N,
      park: sealParkedWrap(wk.key, keys.vaultKey, desktopId),
    };
  }

  /**
   * The password and this device's secret open the wrap; the state is then checked against the
   * vault key. Policy is not checked here: online operations (check-in, resume) use this, the
   * broker being the authority; offline use goes through unlock() (key-release.ts).
   */
  async openKeys(device: DeviceIdentity, password: string, found: DesktopState, opts: { unlockShare?: string | null } = {}): Promise<{ keys: DesktopKeys; state: DesktopState; wrapKey: WrapKey | null }> {
    const stored = await this.readState(found.desktopId);
    if (!stored) throw new CarryonError('not-held', `desktop ${found.name} is not checked out to this device`);
    const { state } = stored;
    // Online, the broker's share opens the online wrap (online-unlock.ts): no scrypt. Else, or where it does not open, the password's wrap.
    let keys = opts.unlockShare && state.keys.online
      ? await traced('vault-keys(online)', () => openOnlineWrap(device, password, opts.unlockShare!, state.keys.online!, state.desktopId, state.checkoutId))
      : null;
    let wrapKey: WrapKey | null = null;
    if (!keys && !state.keys.wrapped) {
      throw new CarryonError('vault-incomplete', `the check-out of ${state.name} was cut off before its keys were kept for offline use: run \`carryon checkout ${state.name}\` again while online`);
    }
    if (!keys) {
      checkStoredCost(state.keys.N, `the vault of ${state.name}`);
      wrapKey = await traced('vault-keys(kdf)', () => deriveWrapKey(device, password, Buffer.from(state.keys.salt, 'base64'), state.keys.N));
      try {
        keys = openDesktopKeys(wrapKey.key, Buffer.from(state.keys.wrapped!, 'base64'), state.desktopId);
      } catch (err) {
        if (err instanceof EnvelopeError || err instanceof SyntaxError) throw new CarryonError('vault-locked', 'the vault does not open: wrong password, or this vault belongs to another device');
        throw err;
      }
    }
    if (!recordMacOk(keys, state.desktopId, 'state', stored.body, stored.mac)) {
      throw new CarryonError('state-tampered', `the state of ${state.name} was altered outside Carryon: refusing to open it (check it in from an unaltered copy, or roll back)`);
    }
    if (!keys.deviceKey.equals(createPublicKey(device.privateKey))) throw new CarryonError('vault-locked', 'this vault belongs to another device identity');
    return { keys, state, wrapKey };
  }


  /** Locked unless the unlock token still matches (no keys needed: the agent and status use it). */
  async isLocked(state: DesktopState): Promise<boolean> {
    return isLockedByToken(this.desktopDir(state.desktopId), state.lockDigest);
  }

  /** The newest lease as stored, not verified (for the agent's decisions, which can only lock). */
  async storedLease(state: DesktopState): Promise<SignedLease> {
    // Damaged reads as none: the agent's decisions from it can only lock (deleting the file does as much).
    return readJsonFile(join(this.desktopDir(state.desktopId), LEASE), SignedLease, { missing: state.lease, damaged: state.lease });
  }

  /**
   * Writes a manifest (named by its digest). Bytes: one encoded already (the broker's, a parked
   * copy's, checked against their digest), written as they are. A decoded one is also offered to
   * this command's next read of it (`manifest`): manifests are never changed in place once made.
   */
  async putManifest(desktopId: string, m: Manifest | Uint8Array): Promise<string> {
    const encoded = m instanceof Uint8Array ? Buffer.from(m.buffer, m.byteOffset, m.byteLength) : encodeManifest(m);
    const digest = encodedDigest(encoded);
    const dir = join(this.desktopDir(desktopId), 'manifests');
    await mkdir(dir, { recursive: true, mode: 0o700 });
    await writeFileAtomic(join(dir, digest), encoded);
    if (!(m instanceof Uint8Array)) this.offerManifest(desktopId, digest, m);
    return digest;
  }

  /** Manifests read ahead (`readManifestAhead`), each handed out once. */
  private readonly manifestsAhead = new Map<string, Promise<Manifest>>();

  /**
   * Starts reading a manifest the command will ask for (a check-in: while the broker checks the
   * password). Content-addressed and checked against its digest as read, so the bytes are the
   * ones `manifest` would read; the next `manifest` call for it takes it (its errors surface there).
   */
  readManifestAhead(desktopId: string, digest: string): void {
    const key = `${desktopId}/${digest}`;
    if (this.manifestsAhead.has(key)) return;
    const read = this.readManifest(desktopId, digest);
    read.catch(() => undefined);
    this.manifestsAhead.set(key, read);
  }

  /** A manifest this command holds already, checked against `digest`: the next `manifest` call for it takes it. */
  offerManifest(desktopId: string, digest: string, m: Manifest): void {
    this.manifestsAhead.set(`${desktopId}/${digest}`, Promise.resolve(m));
  }

  /** A checkpoint manifest, checked against the digest that names it (which the MACed state pins). */
  async manifest(desktopId: string, digest: string): Promise<Manifest> {
    const key = `${desktopId}/${digest}`;
    const ahead = this.manifestsAhead.get(key);
    if (ahead) {
      this.manifestsAhead.delete(key);
      return ahead;
    }
    return this.readManifest(desktopId, digest);
  }

  private async readManifest(desktopId: string, digest: string): Promise<Manifest> {
    if (!/^[0-9a-f]{64}$/.test(digest)) throw new CarryonError('bad-state', `bad manifest digest ${digest}`);
    let raw: Buffer;
    try {
      raw = await readFile(join(this.desktopDir(desktopId), 'manifests', digest));
    } catch {
      throw new CarryonError('bad-state', `manifest ${digest.slice(0, 12)}… of desktop ${desktopId} is missing from the vault`);
    }
    // The digest names these exact bytes (encodeManifest is canonical): hashed as read, no re-encoding.
    if (encodedDigest(raw) !== digest) throw new CarryonError('bad-state', `manifest ${digest.slice(0, 12)}… of desktop ${desktopId} is damaged`);
    try {
      return decodeManifest(raw);
    } catch (err) {
      throw new CarryonError('bad-state', `manifest ${digest.slice(0, 12)}… of desktop ${desktopId} is damaged: ${(err as Error).message}`);
    }
  }

  /** Bytes the vault takes: checked-out desktops and parked copies. */
  async sizeBytes(): Promise<number> {
    const desktops = await new Promise<number>((resolve) => execFile('du', ['-sb', join(this.home, 'desktops')], (err, out) => resolve(err ? 0 : Number(out.split('\t')[0]) || 0)));
    return desktops + (await listParked(this.home)).reduce((n, p) => n + p.bytes, 0);
  }

  /** The user's local settings, presentation only (display, keyboard): never policy. */
  async readLocalConfig(desktopId: string): Promise<Record<string, unknown>> {
    // Presentation only (never policy): damaged reads as no settings.
    return presentationOnly(await readJsonFile(join(this.desktopDir(desktopId), 'local-config.json'), z.record(z.string(), z.unknown()), { missing: {}, damaged: {} }));
  }
}

/** Remembers presentation settings (`run --display`, `--monitors`) for the desktop's next runs (local-config.json). */
export async function rememberLocalConfig(desktopDir: string, values: Record<string, unknown>): Promise<void> {
  const path = join(desktopDir, 'local-config.json');
  const current = await readJsonFile(path, z.record(z.string(), z.unknown()), { missing: {}, damaged: {} });
  await writeFileAtomic(path, JSON.stringify({ ...current, ...presentationOnly(values) }, null, 2));
}
