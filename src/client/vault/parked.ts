import { createHmac, hkdfSync, randomBytes, timingSafeEqual } from 'node:crypto';
import { existsSync } from 'node:fs';
import { link, mkdir, readdir, readFile, rename, rm, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { z } from 'zod';
import { chunkLength } from '../../core/chunks/chunking.js';
import { openEnvelope, sealEnvelope } from '../../core/envelope.js';
import { CarryonError, EnvelopeError } from '../../core/errors.js';
import { copyOnReadSafe } from '../../disk/layer-template.js';
import { deriveDiskSecret } from '../../core/keys.js';
import { decodeManifest, encodedDigest, encodeManifest, type Manifest } from '../../core/chunks/manifest.js';
import { chainBytesOnDisk, chainFiles, eraseChainKeys, eraseLayerKeys, layerSecret } from '../../disk/chain.js';
import { measureLayer, shapeWithoutLuks } from '../../disk/layer-shape.js';
import { fileStamp, sameStamp } from '../../files/stamped.js';
import { addPassphrase, keepOnlyPassphrase, luksUuid } from '../../disk/luks-rekey.js';
import { unmapChunksExcept } from '../../disk/qcow2/qcow2-unmap.js';
import { UnsupportedImage } from '../../disk/qcow2/qcow2-format.js';
import { syncPath, writeFileAtomic } from '../../files/atomic.js';
import type { DesktopKeys } from '../../live/disks/desktop-keys.js';
import { recordMac, recordMacOk } from '../../live/disks/desktop-keys.js';
import { chainOf, diskDir } from '../../live/disks/disks.js';
import { readFilled, writeFilled } from '../../live/fill/fill-direct.js';
import { clearDeltaBases, deltaCandidates, dropDeltaBases, hasDeltaBases, keptForPages, writeDeltaBases } from '../../live/fill/delta-bases.js';
import { baseFileSource, chunkIndex, copyLocalChunks, type ChunkSource } from '../../live/fill/local-copy.js';
import { Qcow2BaseWriter } from '../../disk/qcow2/qcow2-base-writer.js';
import { emptyTrash, shred } from './guards.js';
import type { DeviceIdentity } from './home.js';
import { readJsonFile } from '../../files/json-file.js';
import { checkStoredCost, deriveWrapKey, reusableWrapKey, vaultScryptN, type WrapKey } from './kdf.js';
import { traced } from '../../files/trace.js';
import { parkedOnlineKey } from './online-unlock.js';
import type { DesktopRecords, DesktopState } from '../../live/disks/state.js';

const Hex64 = z.string().regex(/^[0-9a-f]{64}$/);
const LayerShapeRecord = z.object({ size: z.number().int(), sha256: Hex64 });

/**
 * Parked copies. After check-in, rollback or cancel the laptop keeps each disk's base layer
 * (`<home>/parked/<desktop>/disks/<disk>/base.qcow2`, still LUKS-encrypted under the old vault's
 * base secret) with the manifest it equals, so the next check-out of that desktop by the same
 * user on this device fetches only the chunks that differ.
 *
 * Keys. The base's LUKS secret is HKDF(old vault key ‖ lineage keys, …, old wrap salt). The old
 * vault (state.json and its wrap) is erased as before; the parked record keeps only the old
 * vault key, wrapped under scrypt(device secret ‖ password) with a salt of its own, and no
 * lineage key. So opening a parked copy takes this device, the password, and the lineage keys
 * that only a new check-out hands out (the broker's checks: entitlement, policy, device not
 * revoked). A parked copy is never runnable: nothing but `checkout` derives its secret.
 *
 * Taking it over (`adoptParked`): the new vault's base secret is added as a second LUKS key slot
 * (the volume key stays, so no data is rewritten), the base is moved into the new vault, every
 * cluster whose chunk differs from the new checkpoint is unmapped and freed (so it reads as a hole, or
 * from the remote backing `run`/`serve` give an incomplete base), the old slot is removed, and
 * the matching chunks are recorded in `filled.json`: the normal fill fetches only the rest.
 *
 * Crash safety. Parking publishes the copy with one rename of a complete directory (its base a
 * hard link to the vault's), then the vault is erased; a check-in cut off after its commit
 * (`parking` in the MACed state) finishes that on its rerun. Adoption writes `reuse.json`
 * (MACed, naming the LUKS UUID of the parked base) before the base moves, and `filled.json` only
 * after the unmapping is durable; a rerun of the check-out finishes it. A base whose UUID is not
 * the parked one is never marked.
 */

const ParkedDisk = z.object({
  name: z.string().regex(/^[A-Za-z0-9._-]{1,64}$/),
  /** The manifest the base equals (at the indexes in `known`, or everywhere when null). `shape`: its structure without the LUKS header. */
  digest: Hex64,
  /** A cancelled check-out's base holds only the chunks it made durable. */
  known: z.array(z.number().int().nonnegative()).nullable(),
  shape: LayerShapeRecord,
  /** The base file as parking left it: unchanged since (and so as trusted as the vault's base was), or not taken over. */
  stamp: z.object({ size: z.number().int(), mtimeMs: z.number(), ctimeMs: z.number(), ino: z.number() }).nullable().default(null),
});
const ParkedRecord = z.object({
  v: z.literal(1),
  desktopId: z.string(),
  name: z.string(),
  user: z.string(),
  deviceId: z.string(),
  fromCheckout: z.string(),
  how: z.enum(['checkin', 'rollback', 'cancel']),
  parkedAt: z.string(),
  /** The old vault's wrap salt and secret scheme: the base's LUKS secret derives from them. */
  vaultSalt: z.string(),
  layerSecrets: z.enum(['one-per-disk', 'per-layer']),
  /** The old vault key under scrypt(device secret ‖ password, salt). */
  wrap: z.object({ salt: z.string(), wrapped: z.string(), N: z.number().int() }),
  /** The old vault key under the online key of the check-out it was parked from (online-unlock.ts `parkedOnlineKey`): opened without the KDF at the next check-out. */
  online: z.object({ checkoutId: z.string(), wrapped: z.string() }).optional(),
  disks: z.array(ParkedDisk),
});
export type ParkedRecord = z.infer<typeof ParkedRecord>;
const ParkedFile = z.object({ v: z.literal(1), body: z.string(), mac: z.string() });

const Reuse = z.object({ v: z.literal(1), parkedDigest: Hex64, known: z.array(z.number().int().nonnegative()).nullable(), uuid: z.string() });
const ReuseFile = z.object({ body: z.string(), mac: z.string() });

export function parkedRoot(home: string): string {
  return join(home, 'parked');
}

function parkedDir(home: string, desktopId: string): string {
  if (!/^[A-Za-z0-9-]{1,64}$/.test(desktopId)) throw new CarryonError('invalid', `bad desktop id ${desktopId}`);
  return join(parkedRoot(home), desktopId);
}

const wrapAad = (desktopId: string) => Buffer.from(`carryon-parked:v1:${desktopId}`);

/** The vault key as a parked record wraps it, under a wrap key (kdf.ts) and its salt. */
export function sealParkedWrap(key: Buffer, vaultKey: Buffer, desktopId: string): string {
  return sealEnvelope(key, vaultKey, wrapAad(desktopId)).toString('base64');
}

function parkedMac(vaultKey: Buffer, desktopId: string, body: string): string {
  const k = Buffer.from(hkdfSync('sha256', vaultKey, Buffer.alloc(0), `carryon-parked-mac:${desktopId}`, 32));
  return createHmac('sha256', k).update(body, 'utf8').digest('hex');
}

/** The parked copy of a desktop as stored (not authenticated: enough to list, size and erase). */
export async function readParked(home: string, desktopId: string): Promise<ParkedRecord | null> {
  const file = await readJsonFile(join(parkedDir(home, desktopId), 'parked.json'), ParkedFile, { missing: null, damaged: null });
  if (!file) return null;
  try {
    return ParkedRecord.parse(JSON.parse(file.body));
  } catch {
    return null;
  }
}

/** Every parked copy on this laptop, with the bytes it takes. A directory without a readable record counts too (erased by `discard`). */
export async function listParked(home: string): Promise<{ desktopId: string; name: string; user: string; parkedAt: string | null; bytes: number }[]> {
  const out = [];
  for (const id of await readdir(parkedRoot(home)).catch(() => [] as string[])) {
    if (id.startsWith('.')) continue;
    const rec = await readParked(home, id).catch(() => null);
    let bytes = 0;
    for (const d of await readdir(join(parkedRoot(home), id, 'disks')).catch(() => [] as string[])) bytes += (await chainBytesOnDisk(chainFiles(join(parkedRoot(home), id, 'disks', d)))).base;
    out.push({ desktopId: id, name: rec?.name ?? id, user: rec?.user ?? '?', parkedAt: rec?.parkedAt ?? null, bytes });
  }
  return out;
}

/** Finds a parked copy by desktop name or id. */
export async function findParked(home: string, ref: string): Promise<{ desktopId: string; name: string; bytes: number } | null> {
  return (await listParked(home)).find((p) => p.desktopId === ref || p.name === ref) ?? null;
}

/** The refusal for a command that needs a checked-out desktop when only a parked copy is here. */
export function parkedRefusal(name: string): CarryonError {
  return new CarryonError('parked', `${name} is not checked out to this device: only a parked copy is here (encrypted, kept after the last check-in, rollback or cancel so the next check-out moves only what changed). It cannot be run, served or exported; check it out again (\`carryon checkout ${name}\`), or remove it (\`carryon discard ${name} --yes\`)`);
}

/**
 * A check-in on this laptop that did not finish, in words for `status` and refusals (null if none).
 * Committed (`parking`, saved once the broker answered the commit): only putting the copy away is
 * left. Otherwise this laptop does not know whether the broker committed it: the check-in's rerun asks.
 */
export function unfinishedCheckin(state: DesktopState): string | null {
  const rerun = `run \`carryon checkin ${state.name}\` to finish it`;
  if (state.parking) return `checked in (snapshot ${state.parking}); putting its local copy away was cut off: ${rerun} (\`carryon checkout ${state.name}\` finishes it too, then checks it out again from that copy)`;
  if (state.state === 'checking_in') return `a check-in was cut off before its commit was confirmed here: ${rerun}`;
  return null;
}

/**
 * Crypto-erase of a parked copy (discard, wipe, revocation, policy): the record (its wrap) and
 * each base's LUKS header are overwritten, then the directory goes to the trash.
 */
export async function eraseParked(home: string, desktopId: string): Promise<boolean> {
  const dir = parkedDir(home, desktopId);
  if (!existsSync(dir)) return false;
  const disks = await readdir(join(dir, 'disks')).catch(() => [] as string[]);
  await Promise.all([shred(join(dir, 'parked.json')), ...disks.map((d) => eraseChainKeys(join(dir, 'disks', d)))]);
  const trash = join(home, 'trash');
  await mkdir(trash, { recursive: true, mode: 0o700 });
  try {
    await rename(dir, join(trash, `parked-${desktopId}.${Date.now()}.${randomBytes(4).toString('hex')}`));
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'ENOENT') await rm(dir, { recursive: true, force: true });
    return true;
  }
  emptyTrash(trash);
  return true;
}

/** Every parked copy erased (device revoked). */
export async function eraseAllParked(home: string): Promise<number> {
  let n = 0;
  for (const p of await listParked(home)) if (await eraseParked(home, p.desktopId)) n++;
  return n;
}

/**
 * Half-made parked directories (a kill before the publishing rename). Their bases are hard links
 * to a vault's live base, so they are only unlinked, never erased.
 */
async function sweepUnpublished(home: string, desktopId: string): Promise<void> {
  // This desktop's only (the caller holds its owner claim): another desktop may be parking right now.
  for (const name of await readdir(parkedRoot(home)).catch(() => [] as string[])) {
    if (name.startsWith(`.${desktopId}.`) && name.endsWith('.new')) await rm(join(parkedRoot(home), name), { recursive: true, force: true });
  }
}

/** The check-out's policy on parked copies (kept MACed in the state's config). */
export function parkPolicy(policy: Record<string, { value?: unknown } | undefined> | undefined): { keepLocalCopy: boolean; keepLocalCopyMaxGiB: number; keepLocalCopyDays: number } {
  return {
    keepLocalCopy: policy?.keepLocalCopy?.value !== false,
    keepLocalCopyMaxGiB: Number(policy?.keepLocalCopyMaxGiB?.value ?? 0) || 0,
    keepLocalCopyDays: Number(policy?.keepLocalCopyDays?.value ?? 0) || 0,
  };
}

/** Whether policy (kept MACed with the check-out) lets this laptop park the desktop at all. */
export function keepsLocalCopy(state: DesktopState): boolean {
  return statePolicy(state).keepLocalCopy && !state.damaged;
}

function statePolicy(state: DesktopState) {
  return { keepLocalCopy: state.config.keepLocalCopy !== false, maxGiB: Number(state.config.keepLocalCopyMaxGiB ?? 0) || 0, days: Number(state.config.keepLocalCopyDays ?? 0) || 0 };
}

/**
 * Parks what the vault of `state` holds, if policy keeps local copies: per disk, its base (which
 * must equal `digest`, or the manifest at `known` indexes). The vault itself is the caller's to
 * erase afterwards (its bases' names are already unlinked then). Returns whether it parked.
 * `wrapKey`: the vault's own, as the caller just derived it to open the vault (kdf.ts).
 */
export async function parkBases(o: { vault: DesktopRecords; device: DeviceIdentity; password: string; state: DesktopState; keys: DesktopKeys; how: ParkedRecord['how']; disks: { name: string; digest: string; known: number[] | null }[]; log: (l: string) => void; wrapKey?: WrapKey | null; unlockShare?: string | null }): Promise<boolean> {
  const { vault, state, keys } = o;
  const home = vault.home;
  const policy = statePolicy(state);
  if (!keepsLocalCopy(state)) return false;
  const disks = [];
  let bytes = 0;
  for (const d of o.disks) {
    const base = chainOf(vault, state, keys, d.name).files.base;
    if (!existsSync(base)) continue;
    bytes += (await chainBytesOnDisk({ base, top: '' })).base;
    // Measured with the record the merge made of this base (nothing wrote it since), else now.
    const recorded = shapeWithoutLuks(state.disks.find((x) => x.name === d.name)?.shapes.base);
    disks.push({ ...d, base, shape: recorded ?? await traced('park-shape', () => measureLayer(base, { withoutLuks: true })) });
  }
  if (disks.length === 0) return false;
  if (policy.maxGiB > 0 && bytes > policy.maxGiB * 1024 ** 3) {
    o.log(`${state.name}: the local copy (${(bytes / 1024 ** 3).toFixed(2)} GiB) is larger than policy keepLocalCopyMaxGiB (${policy.maxGiB}): erased, not parked`);
    return false;
  }
  await sweepUnpublished(home, state.desktopId);
  const final = parkedDir(home, state.desktopId);
  // A copy parked before (another user's, or one a kill left behind) gives way to this one.
  await traced('park-erase-old', () => eraseParked(home, state.desktopId));
  const tmp = join(parkedRoot(home), `.${state.desktopId}.${randomBytes(4).toString('hex')}.new`);
  await mkdir(join(tmp, 'manifests'), { recursive: true, mode: 0o700 });
  // Made at check-out under the vault's own wrap key (no KDF now), else sealed now.
  const made = state.keys.park ? { salt: state.keys.salt, wrapped: state.keys.park, N: state.keys.N } : null;
  const wk = made ? null : reusableWrapKey(o.wrapKey) ?? await traced('park-wrap(kdf)', () => deriveWrapKey(o.device, o.password, randomBytes(16), vaultScryptN()));
  const record: ParkedRecord = {
    v: 1, desktopId: state.desktopId, name: state.name, user: state.user, deviceId: leaseDeviceOf(state), fromCheckout: state.checkoutId, how: o.how,
    parkedAt: new Date().toISOString(), vaultSalt: state.keys.salt, layerSecrets: state.layerSecrets,
    wrap: made ?? { salt: wk!.salt.toString('base64'), wrapped: sealParkedWrap(wk!.key, keys.vaultKey, state.desktopId), N: wk!.N },
    // The check-out's share (given with this command's password check) seals it once more: the next check-out opens it without the KDF.
    ...(o.unlockShare ? { online: { checkoutId: state.checkoutId, wrapped: sealParkedWrap(await parkedOnlineKey(o.device, o.password, o.unlockShare, state.desktopId, state.checkoutId), keys.vaultKey, state.desktopId) } } : {}),
    disks: disks.map(({ name, digest, known, shape }) => ({ name, digest, known, shape, stamp: null })),
  };
  for (const d of disks) {
    // The vault's own file, linked: content-addressed, written durably when it was put, and checked
    // against its digest when read back (readParkedManifest); `Vault.wipe` unlinks manifests, never
    // overwrites them (it shreds the state and token only). Decoding and writing it again cost ≈ 10 ms.
    await link(join(vault.desktopDir(state.desktopId), 'manifests', d.digest), join(tmp, 'manifests', d.digest))
      .catch(async () => writeFileAtomic(join(tmp, 'manifests', d.digest), encodeManifest(await vault.manifest(state.desktopId, d.digest))));
    await mkdir(join(tmp, 'disks', d.name), { recursive: true, mode: 0o700 });
    await link(d.base, chainFiles(join(tmp, 'disks', d.name)).base);
  }
  const body = JSON.stringify(record);
  await writeFileAtomic(join(tmp, 'parked.json'), JSON.stringify({ v: 1, body, mac: parkedMac(keys.vaultKey, state.desktopId, body) }));
  await traced('park-publish', async () => {
    await syncPath(join(tmp, 'manifests'));
    await syncPath(tmp);
    await rename(tmp, final);
    await syncPath(parkedRoot(home));
  });
  testHooks.afterPublish?.();
  await traced('park-unlink+stamp', async () => {
    await unlinkVaultBases(vault, state);
    await stampParked(vault.home, state.desktopId, keys.vaultKey);
  });
  const how = o.how === 'checkin' ? 'as checked in' : o.how === 'rollback' ? 'as of its checkpoint' : 'what had arrived';
  o.log(`kept a parked copy of ${state.name} (${how}, ${(bytes / 1024 ** 2).toFixed(1)} MiB, encrypted): the next check-out on this device moves only what changed; \`carryon discard ${state.name} --yes\` removes it`);
  return true;
}

/**
 * Records each parked base's file stamp (MACed) once nothing of ours will touch it any more (the
 * vault's names are unlinked: that changes its ctime). A copy without stamps, or whose stamp
 * changed, is never taken over. `vaultKey`: the old vault's.
 */
export async function stampParked(home: string, desktopId: string, vaultKey: Buffer, only?: { disk: string }): Promise<void> {
  const dir = parkedDir(home, desktopId);
  const rec = await readParked(home, desktopId);
  if (!rec) return;
  const disks = [];
  for (const d of rec.disks) disks.push(!only || only.disk === d.name ? { ...d, stamp: await fileStamp(chainFiles(join(dir, 'disks', d.name)).base) } : d);
  const body = JSON.stringify({ ...rec, disks });
  await writeFileAtomic(join(dir, 'parked.json'), JSON.stringify({ v: 1, body, mac: parkedMac(vaultKey, desktopId, body) }));
}


/** The vault's names of bases now parked (same inode), so erasing the vault leaves them whole. */
export async function unlinkVaultBases(vault: DesktopRecords, state: DesktopState): Promise<void> {
  const rec = await readParked(vault.home, state.desktopId);
  if (!rec || rec.fromCheckout !== state.checkoutId) return;
  for (const d of rec.disks) {
    const mine = chainFiles(diskDir(vault, state.desktopId, d.name)).base;
    const theirs = chainFiles(join(parkedDir(vault.home, state.desktopId), 'disks', d.name)).base;
    const [a, b] = await Promise.all([stat(mine).catch(() => null), stat(theirs).catch(() => null)]);
    if (a && b && a.ino === b.ino && a.dev === b.dev) await rm(mine);
  }
}

/** Whether the parked copy of `state`'s desktop came from this very check-out (a rerun after a kill). */
export async function parkedFrom(vault: DesktopRecords, state: DesktopState): Promise<boolean> {
  return (await readParked(vault.home, state.desktopId))?.fromCheckout === state.checkoutId;
}


function leaseDeviceOf(state: DesktopState): string {
  const payload = JSON.parse(Buffer.from(state.lease.payload, 'base64').toString('utf8')) as { deviceId?: unknown };
  return typeof payload.deviceId === 'string' ? payload.deviceId : '';
}

/** Indexes where the parked base already holds the new checkpoint's chunk. */
export function matchingChunks(parked: Manifest, next: Manifest, known: readonly number[] | null): number[] {
  if (parked.chunkSize !== next.chunkSize || parked.diskSize !== next.diskSize) return [];
  const knownSet = known ? new Set(known) : null;
  const out: number[] = [];
  next.chunks.forEach((id, i) => {
    if (id && parked.chunks[i] === id && (!knownSet || knownSet.has(i))) out.push(i);
  });
  return out;
}

/**
 * Indexes of `next` that want a chunk the parked base holds at another index (moved on the server,
 * or a copy of another chunk): copied inside the base at take-over instead of fetched.
 */
export function movedChunks(parked: Manifest, next: Manifest, known: readonly number[] | null): number[] {
  if (parked.chunkSize !== next.chunkSize || parked.diskSize !== next.diskSize) return [];
  const held = new Set(chunkIndex(parked, known, new Set(next.chunks.filter((id): id is string => id !== null))).keys());
  const out: number[] = [];
  next.chunks.forEach((id, i) => {
    if (id && parked.chunks[i] !== id && held.has(id)) out.push(i);
  });
  return out;
}

/**
 * Before a check-out makes its layers (new or resumed): takes over the desktop's parked copy if
 * there is one this user, device and policy may use, and finishes a take-over a kill cut short.
 * Anything that does not fit is erased and the check-out goes on as a fresh one.
 */
export async function adoptParked(o: { vault: DesktopRecords; device: DeviceIdentity; password: () => Promise<string>; state: DesktopState; keys: DesktopKeys; log: (l: string) => void; opened?: OpenedParked | null }): Promise<Reused> {
  const { vault, state, keys, log } = o;
  await sweepUnpublished(vault.home, state.desktopId);
  const rec = await readParked(vault.home, state.desktopId);
  if (rec) {
    const why = parkedUnusable(rec, state);
    if (why) {
      await eraseParked(vault.home, state.desktopId);
      log(`erased the parked copy of ${state.name}: ${why}`);
    } else {
      try {
        await takeOver(o, rec);
      } catch (err) {
        log(`the parked copy of ${state.name} cannot be used (${(err as Error).message}): erased; fetching everything`);
      }
      await eraseParked(vault.home, state.desktopId);
    }
  }
  return finishPendingReuse(vault, state, keys, log, { keepDeltaBases: true });
}

/**
 * Why a check-out (`state`: its user, device and policy) may not read a parked copy, or null: the
 * copy of the desktop itself, or of a sibling of the same lineage (local-sources.ts).
 */
export function parkedUnusable(rec: ParkedRecord, state: DesktopState): string | null {
  const policy = statePolicy(state);
  const ageDays = (Date.now() - Date.parse(rec.parkedAt)) / 86_400_000;
  return !policy.keepLocalCopy ? 'policy keepLocalCopy is off'
    : policy.days > 0 && ageDays > policy.days ? `it is older than policy keepLocalCopyDays (${policy.days})`
      : rec.user !== state.user ? 'it belongs to another user'
        : rec.deviceId !== leaseDeviceOf(state) ? 'it was parked under another device identity'
          : null;
}

/**
 * Opens a parked record with this device and password: its old vault key (unwrapped) and the
 * record as MACed under it. Throws 'vault-locked' (wrong password or device) or 'state-tampered'.
 */
export async function openParked(home: string, desktopId: string, device: DeviceIdentity, password: string, share?: string | null): Promise<OpenedParked> {
  const file = await readJsonFile(join(parkedDir(home, desktopId), 'parked.json'), ParkedFile, { missing: null, damaged: null });
  if (!file) throw new CarryonError('bad-state', 'its record is missing');
  let rec: ParkedRecord;
  try {
    rec = ParkedRecord.parse(JSON.parse(file.body));
  } catch {
    throw new CarryonError('bad-state', 'its record is damaged');
  }
  if (rec.desktopId !== desktopId) throw new CarryonError('state-tampered', 'its record names another desktop');
  // With the broker's share for the check-out it was parked from: no KDF. Else (or where it does not open) the password's wrap.
  let oldVaultKey = share && rec.online ? await openOnlineParked(device, password, share, rec, desktopId) : null;
  let wrapKey: WrapKey | null = null;
  if (!oldVaultKey) {
    checkStoredCost(rec.wrap.N, `the parked copy of ${rec.name}`);
    wrapKey = await traced('parked-keys(kdf)', () => deriveWrapKey(device, password, Buffer.from(rec.wrap.salt, 'base64'), rec.wrap.N));
    try {
      oldVaultKey = openEnvelope(wrapKey.key, Buffer.from(rec.wrap.wrapped, 'base64'), wrapAad(desktopId));
    } catch (err) {
      if (err instanceof EnvelopeError) throw new CarryonError('vault-locked', 'its wrap does not open with this password and device');
      throw err;
    }
  }
  const want = Buffer.from(parkedMac(oldVaultKey, desktopId, file.body), 'hex');
  const got = Buffer.from(/^[0-9a-f]{64}$/.test(file.mac) ? file.mac : '', 'hex');
  if (got.length !== want.length || !timingSafeEqual(got, want)) throw new CarryonError('state-tampered', 'its record was altered');
  return { rec, oldVaultKey, wrapKey };
}

/** A parked record's online wrap, opened with the share; null where it does not open. */
async function openOnlineParked(device: DeviceIdentity, password: string, share: string, rec: ParkedRecord, desktopId: string): Promise<Buffer | null> {
  try {
    return openEnvelope(await parkedOnlineKey(device, password, share, desktopId, rec.online!.checkoutId), Buffer.from(rec.online!.wrapped, 'base64'), wrapAad(desktopId));
  } catch (err) {
    if (err instanceof EnvelopeError || (err instanceof CarryonError && err.code === 'bad-response')) return null;
    throw err;
  }
}

/**
 * A check-out about to wrap its new vault: opens this desktop's parked copy first if it is this
 * user's, so the new wrap reuses the key that opened it (one KDF, kdf.ts). Null when there is none
 * or it does not open (the take-over then decides, as before).
 */
export async function openOwnParked(home: string, desktopId: string, user: string, device: DeviceIdentity, password: () => Promise<string>, share?: string | null): Promise<OpenedParked | null> {
  try {
    const rec = await readParked(home, desktopId);
    return rec && rec.user === user ? await openParked(home, desktopId, device, await password(), share) : null;
  } catch {
    return null;
  }
}

/** An opened parked record; `wrapKey`: what opened it, for the new vault's wrap (kdf.ts); null: the online wrap opened it. */
export interface OpenedParked { rec: ParkedRecord; oldVaultKey: Buffer; wrapKey: WrapKey | null }

/** A parked copy's manifest, checked against the digest that names it (the record that names the digest is not checked here). */
export async function readParkedManifest(home: string, desktopId: string, digest: string): Promise<Manifest> {
  return (await readParkedManifestBytes(home, desktopId, digest, 'a manifest of the parked copy')).manifest;
}

/** The same with the bytes it was decoded from (a take-over stores them as they are). `what` names it in the refusal. */
async function readParkedManifestBytes(home: string, desktopId: string, digest: string, what: string): Promise<{ raw: Buffer; manifest: Manifest }> {
  if (!/^[0-9a-f]{64}$/.test(digest)) throw new CarryonError('bad-state', `bad manifest digest ${digest}`);
  const raw = await readFile(join(parkedDir(home, desktopId), 'manifests', digest));
  // The digest names these exact bytes (the encoding is canonical): hashed as read, not encoded again.
  if (encodedDigest(raw) !== digest) throw new CarryonError('state-tampered', `${what} was altered`);
  return { raw, manifest: decodeManifest(raw) };
}

/**
 * One disk of an opened parked copy, for reading: its base file, its manifest (checked against
 * the digest the MACed record names) and its LUKS passphrase, derived from the old vault key and
 * the lineage keys `lineage` (a new check-out's: of this desktop, or of one of the same lineage).
 * Refuses a base written since it was parked (its stamp).
 */
export async function parkedDisk(home: string, opened: { rec: ParkedRecord; oldVaultKey: Buffer }, disk: ParkedRecord['disks'][number], lineage: DesktopKeys): Promise<{ path: string; manifest: Manifest; passphrase: string }> {
  const { rec, oldVaultKey } = opened;
  const dir = parkedDir(home, rec.desktopId);
  const path = chainFiles(join(dir, 'disks', disk.name)).base;
  const manifest = await readParkedManifest(home, rec.desktopId, disk.digest);
  if (!sameStamp(disk.stamp, await fileStamp(path))) throw new CarryonError('layer-tampered', `the base of disk ${disk.name} was written since it was parked`);
  const passphrase = deriveDiskSecret({ ...lineage, vaultKey: oldVaultKey }, rec.desktopId, disk.name, Buffer.from(rec.vaultSalt, 'base64'), rec.layerSecrets === 'per-layer' ? 'base' : undefined);
  return { path, manifest, passphrase };
}

/**
 * A take-over a kill cut short is finished before anything opens the chain (check-out, and
 * `run`/`serve` continuing one): until then the moved base still maps chunks that differ. A
 * check-out (`keepDeltaBases`) keeps the changed chunks mapped for delta records
 * (live/fill/delta-bases.ts); for a guest they are unmapped, so that it reads them remotely.
 */
export async function finishPendingReuse(vault: DesktopRecords, state: DesktopState, keys: DesktopKeys, log: (l: string) => void, opts: { keepDeltaBases?: boolean } = {}): Promise<Reused> {
  const sum: Reused = { reusedChunks: 0, reusedBytes: 0, copiedChunks: 0, rejectedChunks: 0 };
  for (const d of state.disks) {
    const r = await finishReuse(vault, state, keys, d.name, log, opts.keepDeltaBases === true);
    sum.reusedChunks += r.chunks;
    sum.reusedBytes += r.bytes;
    sum.copiedChunks += r.copied;
    sum.rejectedChunks += r.rejected;
    const dir = diskDir(vault, state.desktopId, d.name);
    if (!opts.keepDeltaBases && hasDeltaBases(dir)) {
      const { chunkSize } = await vault.manifest(state.desktopId, d.baseDigest);
      const n = await dropDeltaBases(dir, chainOf(vault, state, keys, d.name).files.base, chunkSize, d.complete);
      if (n) log(`${n} chunks of disk ${d.name} kept for pages are read remotely instead`);
    }
  }
  return sum;
}

/** What a take-over kept: chunks at their index, chunks copied from another index, local copies that failed their check (fetched). */
export interface Reused { reusedChunks: number; reusedBytes: number; copiedChunks: number; rejectedChunks: number }

/** Opens the parked record (password, device), re-keys each usable base and moves it into the new vault. */
async function takeOver(o: { vault: DesktopRecords; device: DeviceIdentity; password: () => Promise<string>; state: DesktopState; keys: DesktopKeys; opened?: OpenedParked | null }, rec: ParkedRecord): Promise<void> {
  const { vault, state, keys } = o;
  const dir = parkedDir(vault.home, state.desktopId);
  // The record as MACed (the one `rec` was read from may have changed since), opened already by the check-out where it could (its KDF shared with the new wrap).
  const opened = o.opened ?? await traced('open-parked(kdf)', async () => openParked(vault.home, state.desktopId, o.device, await o.password()));
  const oldVaultKey = opened.oldVaultKey;
  rec = opened.rec;
  // Before anything moves: a base QEMU could not fill by copy-on-read (a VM started while the rest arrives) is not taken.
  for (const p of rec.disks) {
    const src = chainFiles(join(dir, 'disks', p.name)).base;
    if (existsSync(src) && !(await copyOnReadSafe(src))) throw new CarryonError('unsupported', `the base of disk ${p.name} has subclusters (made by an earlier version), which QEMU cannot fill while the desktop reads it`);
  }
  const salt = Buffer.from(rec.vaultSalt, 'base64');
  for (const d of state.disks) {
    const p = rec.disks.find((x) => x.name === d.name);
    if (!p) continue;
    const target = chainOf(vault, state, keys, d.name);
    if (existsSync(target.files.base)) continue; // made already (this run's own, or one a rerun moved)
    const src = chainFiles(join(dir, 'disks', d.name)).base;
    const { raw, manifest: parked } = await readParkedManifestBytes(vault.home, state.desktopId, p.digest, `the manifest of disk ${d.name}`);
    const next = await vault.manifest(state.desktopId, d.baseDigest);
    if (matchingChunks(parked, next, p.known).length === 0 && movedChunks(parked, next, p.known).length === 0) continue;
    // Its structure as parked; its LUKS header is vouched for by the old passphrase opening it (an earlier, cut-off take-over may have added the new one).
    const shape = await traced('parked-shape', () => measureLayer(src, { withoutLuks: true }));
    if (shape.size !== p.shape.size || shape.sha256 !== p.shape.sha256) throw new CarryonError('layer-tampered', `the base of disk ${d.name} was changed since it was parked`);
    if (!sameStamp(p.stamp, await fileStamp(src))) throw new CarryonError('layer-tampered', `the base of disk ${d.name} was written since it was parked`);
    const oldSecret = deriveDiskSecret({ ...keys, vaultKey: oldVaultKey }, state.desktopId, d.name, salt, rec.layerSecrets === 'per-layer' ? 'base' : undefined);
    await traced('add-passphrase', () => addPassphrase(src, oldSecret, layerSecret(target, 'base')));
    // Our own write: the stamp follows it (a kill before this line costs the reuse, never trust).
    await traced('stamp-parked', () => stampParked(vault.home, state.desktopId, oldVaultKey, { disk: d.name }));
    await vault.putManifest(state.desktopId, raw);
    vault.offerManifest?.(state.desktopId, p.digest, parked);
    const body = JSON.stringify(Reuse.parse({ v: 1, parkedDigest: p.digest, known: p.known, uuid: await luksUuid(src) }));
    await mkdir(diskDir(vault, state.desktopId, d.name), { recursive: true, mode: 0o700 });
    await writeFileAtomic(reusePath(vault, state, d.name), JSON.stringify({ body, mac: recordMac(keys, state.desktopId, `reuse:${d.name}`, body) }));
    testHooks.beforeMove?.();
    await rename(src, target.files.base);
    await syncPath(diskDir(vault, state.desktopId, d.name));
  }
  oldVaultKey.fill(0);
}

const reusePath = (vault: DesktopRecords, state: DesktopState, disk: string) => join(diskDir(vault, state.desktopId, disk), 'reuse.json');

/**
 * The second half of a take-over, run again after any kill: the moved base (recognised by its
 * LUKS UUID) has every chunk that differs from the checkpoint unmapped, then only the new
 * passphrase left, then its matching chunks recorded durable.
 */
async function finishReuse(vault: DesktopRecords, state: DesktopState, keys: DesktopKeys, disk: string, log: (l: string) => void, keepDeltaBases: boolean): Promise<{ chunks: number; bytes: number; copied: number; rejected: number }> {
  const none = { chunks: 0, bytes: 0, copied: 0, rejected: 0 };
  const path = reusePath(vault, state, disk);
  const file = await readJsonFile(path, ReuseFile, { missing: null, damaged: null });
  if (!file) return none;
  const chain = chainOf(vault, state, keys, disk);
  const base = chain.files.base;
  const entry = state.disks.find((d) => d.name === disk)!;
  const parsed = Reuse.safeParse(JSON.parse(file.body));
  const ok = parsed.success && recordMacOk(keys, state.desktopId, `reuse:${disk}`, file.body, file.mac);
  // Not the parked base (never moved, or replaced): nothing is marked; the fill fetches it all.
  if (!ok || !existsSync(base) || (await luksUuid(base).catch(() => '')) !== parsed.data.uuid) {
    await rm(path, { force: true });
    return none;
  }
  const next = await vault.manifest(state.desktopId, entry.baseDigest);
  const parked = await vault.manifest(state.desktopId, parsed.data.parkedDigest);
  const matched = matchingChunks(parked, next, parsed.data.known);
  const dir = diskDir(vault, state.desktopId, disk);
  const keep = new Set([...matched, ...(await readFilled(dir))]);
  // Chunks that moved to another index: copied inside the base while the parked bytes are still mapped.
  const moved = await traced('copy-moved', () => copyMoved({ base, passphrase: layerSecret(chain, 'base'), parked, known: parsed.data.known, next, keep, idKey: keys.idKey, log }));
  for (const i of moved.written) keep.add(i);
  // Changed chunks stay mapped for the fill to write pages over (listed before anything is unmapped; a rerun lists them again).
  const deltas = keepDeltaBases ? deltaCandidates(parked, next, parsed.data.known, keep) : new Map<number, string>();
  const keptMapped = keptForPages(deltas);
  if (deltas.size) await writeDeltaBases(dir, keys, state.desktopId, disk, deltas);
  let unmapped: number;
  try {
    // Metadata only (no key, no writer threads): the chunks that differ go, their clusters are freed.
    unmapped = await traced('unmap-stale', () => unmapChunksExcept(base, next.chunkSize, keptMapped.length ? new Set([...keep, ...keptMapped]) : keep));
  } catch (err) {
    if (!(err instanceof UnsupportedImage)) throw err;
    // A base this code cannot unmap in: made fresh instead (erased first).
    log(`the parked base of ${disk} cannot be reused (${err.message}): fetching everything`);
    await eraseLayerKeys([base]);
    await rm(base, { force: true });
    await rm(join(dir, 'filled.json'), { force: true });
    await clearDeltaBases(dir);
    await rm(path, { force: true });
    return none;
  }
  await traced('keep-only-passphrase', () => keepOnlyPassphrase(base, layerSecret(chain, 'base')));
  testHooks.beforeFilled?.();
  await traced('write-filled', () => writeFilled(dir, keep));
  await rm(path, { force: true });
  const bytes = matched.reduce((n, i) => n + chunkLength(i, next.diskSize, next.chunkSize), 0);
  const copied = moved.written.length ? `, ${moved.written.length} copied from other indexes` : '';
  const kept = keptMapped.length ? `, ${keptMapped.length} kept to receive only their changed pages` : '';
  log(`reused the parked copy of disk ${disk}: ${matched.length} of ${next.chunks.filter(Boolean).length} chunks already here${copied} (${unmapped} stale ones dropped${kept})`);
  return { chunks: matched.length, bytes, copied: moved.written.length, rejected: moved.rejected };
}

/**
 * Copies, inside a taken-over base, each chunk of the new checkpoint that the parked bytes hold
 * at another index (read and checked against its chunk ID, then written; the copies are durable
 * when this returns). A base the Node writer does not take: nothing copied, those chunks travel.
 */
async function copyMoved(o: { base: string; passphrase: string; parked: Manifest; known: number[] | null; next: Manifest; keep: ReadonlySet<number>; idKey: Buffer; log: (l: string) => void }): Promise<{ written: number[]; rejected: number }> {
  const targets = movedChunks(o.parked, o.next, o.known).filter((i) => !o.keep.has(i));
  if (targets.length === 0) return { written: [], rejected: 0 };
  const wanted = new Set(targets.map((i) => o.next.chunks[i]!));
  let writer: Qcow2BaseWriter;
  try {
    writer = await Qcow2BaseWriter.open(o.base, o.passphrase, o.next.chunkSize);
  } catch (err) {
    if (!(err instanceof UnsupportedImage)) throw err;
    o.log(`chunks that moved inside the parked base are fetched (${err.message})`);
    return { written: [], rejected: 0 };
  }
  let source: ChunkSource | null = null;
  try {
    source = await baseFileSource({ label: 'the parked copy', path: o.base, passphrase: o.passphrase, diskSize: o.next.diskSize, chunkSize: o.next.chunkSize, at: chunkIndex(o.parked, o.known, wanted), sameFileAsTarget: true });
    const r = await copyLocalChunks({ target: o.next, present: o.keep, sources: [source], sink: writer, idKey: o.idKey, log: o.log });
    await writer.persist();
    return r;
  } catch (err) {
    // Nothing copied is marked: those indexes are unmapped next, like any other that differs, and fetched.
    o.log(`chunks that moved inside the parked base are fetched (${(err as Error).message})`);
    return { written: [], rejected: 0 };
  } finally {
    await source?.close();
    await writer.close();
  }
}

/**
 * Test-only kill points (CARRYON_TEST_SIGKILL_PARKED = publish | move | filled, under NODE_ENV=test):
 * after a parked copy is published, before a parked base moves into the new vault, before the
 * matching chunks are recorded.
 */
export const testHooks: { afterPublish?: () => void; beforeMove?: () => void; beforeFilled?: () => void } = {};
if (process.env.NODE_ENV === 'test') {
  const at = process.env.CARRYON_TEST_SIGKILL_PARKED;
  const kill = () => process.kill(process.pid, 'SIGKILL');
  if (at === 'publish') testHooks.afterPublish = kill;
  if (at === 'move') testHooks.beforeMove = kill;
  if (at === 'filled') testHooks.beforeFilled = kill;
}
