import { setTimeout as sleep } from 'node:timers/promises';
import { computeChunkId } from '../../core/chunk-id.js';
import { CarryonError } from '../../core/errors.js';
import type { Manifest } from '../../core/chunks/manifest.js';
import { checkChain, layerSecret, type Chain } from '../../disk/chain.js';
import { measureLayer, type LayerShapeRecord } from '../../disk/layer-shape.js';
import { Qcow2Reader } from '../../disk/qcow2/qcow2-reader.js';
import { QemuToolError } from '../../qemu/qemu-tools.js';
import { fileStamp, ReadAhead, sameStamp } from '../../files/stamped.js';
import type { DesktopKeys } from './desktop-keys.js';
import { chainOf, recordDiskFailure } from './disks.js';
import type { DesktopRecords, DesktopState } from './state.js';

/**
 * The laptop's layers as the vault last left them. XTS gives the qcow2 layers secrecy, not
 * integrity, so the MACed state (vault.ts) also holds, per disk:
 * - each layer's shape (size and a digest of its structure, layer-shape.ts), recorded at every
 *   clean close and checked before anything opens the chain: a changed header, table, key slot,
 *   truncation or a layer in the other's place is refused (`layer-tampered`);
 * - the base file's stamp when its every chunk last matched the checkpoint's chunk IDs. The base
 *   is checked in the background while a desktop runs, and before a check-in when the file
 *   changed since; a mismatch marks the desktop damaged (`base-damaged`, MACed) and is reported.
 * While a process may write the layers the state says so (`layersOpen`): after a crash the top
 * cannot match its record, so it is checked with `qemu-img check` and recorded afresh instead.
 */


const WHAT_TO_DO = 'nothing was deleted: put back the files as Carryon left them, or discard this copy (`carryon discard <desktop> --yes`) and check the desktop out again (changes since the last check-in or replica are then lost)';

function damagedError(state: DesktopState): CarryonError {
  const d = state.damaged!;
  return new CarryonError('base-damaged', `${state.name} is marked damaged since ${d.at}: ${d.message}. Its disk is not opened and cannot be checked in; ${WHAT_TO_DO}`);
}

/**
 * What differs between a layer and its record, or null. A missing file differs from any record.
 * `ahead`: the shape may have been measured ahead (used only if the file is unchanged since).
 */
async function layerDiff(path: string, want: LayerShapeRecord | null, ahead?: ReadAhead): Promise<string | null> {
  if (!want) return null;
  let got: LayerShapeRecord;
  try {
    got = ahead ? await ahead.get(measureLayer, path) : await measureLayer(path);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return 'it is missing';
    throw err;
  }
  if (got.size !== want.size) return `its size changed (${want.size} → ${got.size} bytes)`;
  if (got.sha256 !== want.sha256) return 'its structure (header, LUKS header, L1/L2 or refcount tables) changed';
  return null;
}

function tampered(state: DesktopState, disk: string, layer: 'base' | 'top', why: string): CarryonError {
  return new CarryonError('layer-tampered', `the ${layer} layer of disk ${disk} of ${state.name} was changed outside Carryon since it was last closed (${why}): refusing to open it; ${WHAT_TO_DO}`);
}

/**
 * Before a chain opens (the caller holds the owner claim): refuses a damaged desktop and layers
 * that differ from their records. After a crash (`layersOpen` still set) the top is checked by
 * `qemu-img check` and recorded as it is; the window since the last clean close is not covered.
 * Returns the state with any record it made (saved).
 */
export async function checkLayers(vault: DesktopRecords, state: DesktopState, keys: DesktopKeys, log: (l: string) => void, ahead?: ReadAhead): Promise<DesktopState> {
  if (state.damaged) throw damagedError(state);
  let next = state;
  for (const d of state.disks) {
    // A merge a kill interrupted changes both layers legitimately: it is finished, then recorded (disks.ts).
    if (d.mergingTo) continue;
    const chain = chainOf(vault, state, keys, d.name);
    const base = await layerDiff(chain.files.base, d.shapes.base, ahead);
    if (base) throw tampered(state, d.name, 'base', base);
    if (!state.layersOpen) {
      const top = await layerDiff(chain.files.top, d.shapes.top, ahead);
      if (top) throw tampered(state, d.name, 'top', top);
      if (d.shapes.top && d.topClosed && !sameStamp(d.topClosed, await fileStamp(chain.files.top))) {
        // Same structure, other bytes or times: data clusters may have been changed (XTS cannot
        // tell). Reported, not refused: a restored or moved home looks the same.
        const why = `the top layer of disk ${d.name} of ${state.name} was written outside Carryon since it was last closed (its structure is intact; changed data would read as other bytes, which only the guest's file system can notice)`;
        log(why);
        await recordDiskFailure(vault, state.desktopId, why);
        const topClosed = await fileStamp(chain.files.top);
        next = { ...next, disks: next.disks.map((x) => (x.name === d.name ? { ...x, topClosed } : x)) };
      }
      continue;
    }
    if (!d.shapes.top) continue;
    log(`${state.name} was not closed cleanly: checking the top layer of ${d.name}`);
    try {
      await checkChain(chain, ['top']);
    } catch (err) {
      if (!(err instanceof QemuToolError)) throw err;
      // A lock held by a live QEMU is no crash: the layers are in use.
      if (err.code === 'disk-busy') throw new CarryonError('disk-busy', `the disk of ${state.name} is in use by another carryon process (run, serve, checkout or checkin): stop it first`);
      throw new CarryonError('layer-damaged', `the top layer of disk ${d.name} of ${state.name} is damaged after a crash (${err.message}); ${WHAT_TO_DO}`);
    }
    const top = await measureLayer(chain.files.top);
    const topClosed = await fileStamp(chain.files.top);
    next = { ...next, disks: next.disks.map((x) => (x.name === d.name ? { ...x, shapes: { ...x.shapes, top }, topClosed } : x)) };
  }
  if (next !== state) await vault.save(next, keys);
  return next;
}

/** Marks the layers open for writing (MACed) before a process that writes them starts. */
export async function markLayersOpen(vault: DesktopRecords, state: DesktopState, keys: DesktopKeys): Promise<DesktopState> {
  const next = { ...state, layersOpen: true };
  await vault.save(next, keys);
  return next;
}

/**
 * Starts measuring the layers `recordLayers` will record (every top; complete bases), for a caller
 * that waits on something else first; each is used only if its file is unchanged since.
 */
export function measureLayersAhead(vault: DesktopRecords, state: DesktopState, keys: DesktopKeys): ReadAhead {
  const ahead = new ReadAhead();
  for (const d of state.disks) {
    const { files } = chainOf(vault, state, keys, d.name);
    ahead.start(measureLayer, files.top);
    if (d.complete) ahead.start(measureLayer, files.base);
  }
  return ahead;
}

/**
 * At a clean close (nothing holds the chain any more): records every layer's shape and clears
 * `layersOpen`. `verifiedBases`: bases just written from verified chunks (check-out, a merge).
 */
export async function recordLayers(vault: DesktopRecords, state: DesktopState, keys: DesktopKeys, opts: { verifiedBases?: boolean; topsGone?: boolean; ahead?: ReadAhead } = {}): Promise<DesktopState> {
  const disks = [];
  // `ahead`: shapes measured while the caller waited on something else, used only if the file is unchanged since.
  const measure = (path: string) => (opts.ahead ? opts.ahead.get(measureLayer, path) : measureLayer(path));
  for (const d of state.disks) {
    const { files } = chainOf(vault, state, keys, d.name);
    // `topsGone`: a parked check-in's tops, merged and erased with the vault next: nothing opens them again.
    const top = opts.topsGone ? null : await measure(files.top).catch(() => null);
    const base = d.complete ? await measure(files.base).catch(() => null) : null;
    const baseVerified = opts.verifiedBases && base ? await fileStamp(files.base) : d.baseVerified;
    const topClosed = top ? await fileStamp(files.top) : null;
    disks.push({ ...d, shapes: { base, top }, baseVerified, topClosed });
  }
  const next = { ...state, disks, layersOpen: false };
  await vault.save(next, keys);
  return next;
}

/**
 * For `status` and `export` (no claim, no writes; never throws for a tampered or damaged
 * desktop): what is wrong with the layers, or null. `refused`: opening would be refused.
 */
export async function layerProblem(vault: DesktopRecords, state: DesktopState, keys: DesktopKeys): Promise<{ message: string; refused: boolean } | null> {
  if (state.damaged) return { message: damagedError(state).message, refused: true };
  for (const d of state.disks) {
    const { files } = chainOf(vault, state, keys, d.name);
    const base = await layerDiff(files.base, d.shapes.base);
    if (base) return { message: tampered(state, d.name, 'base', base).message, refused: true };
    // A running desktop's top changes: it is compared only while closed.
    const top = state.layersOpen ? null : await layerDiff(files.top, d.shapes.top);
    if (top) return { message: tampered(state, d.name, 'top', top).message, refused: true };
    if (!state.layersOpen && d.shapes.top && d.topClosed && !sameStamp(d.topClosed, await fileStamp(files.top))) {
      return { message: `the top layer of disk ${d.name} was written outside Carryon since it was last closed (its structure is intact; changed data would read as other bytes)`, refused: false };
    }
  }
  return null;
}

/** Bytes a second the background check reads (CARRYON_VERIFY_RATE; 0 = unthrottled). */
function verifyRate(): number {
  const v = Number(process.env.CARRYON_VERIFY_RATE ?? 32 * 1024 * 1024);
  return Number.isFinite(v) && v >= 0 ? v : 32 * 1024 * 1024;
}

/**
 * Reads every chunk of a complete base (decrypted by Node, no image lock) and compares its chunk
 * ID with the checkpoint's. Returns the first mismatch, or null. `rate` throttles (bytes/s).
 */
export async function findBaseMismatch(chain: Chain, manifest: Manifest, idKey: Uint8Array, opts: { rate?: number; signal?: AbortSignal } = {}): Promise<string | null> {
  const reader = await Qcow2Reader.open(chain.files.base, layerSecret(chain, 'base'));
  try {
    if (reader.diskSize !== manifest.diskSize) return `the base is ${reader.diskSize} bytes, the checkpoint ${manifest.diskSize}`;
    const started = Date.now();
    let read = 0;
    for (let i = 0; i < manifest.chunks.length; i++) {
      if (opts.signal?.aborted) return null;
      const at = i * manifest.chunkSize;
      const plain = await reader.read(at, Math.min(manifest.chunkSize, manifest.diskSize - at));
      const want = manifest.chunks[i];
      const ok = want === null || want === undefined ? isZero(plain) : computeChunkId(idKey, plain) === want;
      if (!ok) return `chunk ${i} (bytes ${at}–${at + plain.length - 1}) does not match the checkpoint's chunk ID`;
      read += plain.length;
      if (opts.rate) {
        const ahead = (read / opts.rate) * 1000 - (Date.now() - started);
        if (ahead > 0) await sleep(ahead, undefined, { signal: opts.signal }).catch(() => undefined);
      } else if (i % 64 === 63) {
        await new Promise((r) => setImmediate(r)); // the event loop (QMP, NBD) goes first
      }
    }
    return null;
  } finally {
    await reader.close();
  }
}

function isZero(b: Buffer): boolean {
  for (let i = 0; i < b.length; i += 8192) if (!b.subarray(i, i + 8192).equals(ZEROS.subarray(0, Math.min(8192, b.length - i)))) return false;
  return true;
}
const ZEROS = Buffer.alloc(8192);

/** Marks the desktop damaged (MACed), files it with the read failures (status, the agent's next heartbeat). */
async function markDamaged(vault: DesktopRecords, state: DesktopState, keys: DesktopKeys, disk: string, why: string): Promise<DesktopState> {
  const message = `the base layer of disk ${disk} no longer matches its checkpoint: ${why}`;
  const next = { ...state, damaged: { at: new Date().toISOString(), disk, message } };
  await vault.save(next, keys);
  await recordDiskFailure(vault, state.desktopId, `${state.name}: ${message}`);
  return next;
}

/**
 * Checks every complete base (whose file is not exactly as last verified, unless `always`)
 * against its checkpoint. A mismatch marks the desktop damaged and throws `base-damaged`.
 * `current`/`update` read and replace the caller's copy of the state (a holder keeps one).
 */
export async function verifyBases(vault: DesktopRecords, keys: DesktopKeys, current: () => DesktopState, update: (s: DesktopState) => void, opts: { always?: boolean; rate?: number; signal?: AbortSignal; stop?: () => Promise<void> } = {}): Promise<void> {
  for (const d of current().disks) {
    if (!d.complete || opts.signal?.aborted) continue;
    const chain = chainOf(vault, current(), keys, d.name);
    const before = await fileStamp(chain.files.base);
    if (!opts.always && sameStamp(d.baseVerified, before)) continue;
    const why = await findBaseMismatch(chain, await vault.manifest(current().desktopId, d.baseDigest), keys.idKey, opts);
    // A base that changed under the check (a live replica's fold writes it) was read half old, half new: no verdict.
    if (why && !sameStamp(before, await fileStamp(chain.files.base))) continue;
    if (why) {
      // Whoever reads the disk is stopped first, then the damage recorded.
      await opts.stop?.();
      const damaged = await markDamaged(vault, current(), keys, d.name, why);
      update(damaged);
      throw damagedError(damaged);
    }
    if (opts.signal?.aborted) return;
    // Recorded only if the file did not change under the check.
    if (!sameStamp(before, await fileStamp(chain.files.base))) continue;
    const next = { ...current(), disks: current().disks.map((x) => (x.name === d.name ? { ...x, baseVerified: before } : x)) };
    await vault.save(next, keys);
    update(next);
  }
}

/**
 * Before a check-in or replica reads the chain (one call from checkin.ts): layers as recorded,
 * not damaged, and each base checked against its checkpoint if its file changed since it was
 * last verified (unthrottled: the user waits).
 */
export async function guardUpload(vault: DesktopRecords, state: DesktopState, keys: DesktopKeys, log: (l: string) => void, ahead?: ReadAhead): Promise<DesktopState> {
  let s = await checkLayers(vault, state, keys, log, ahead);
  await verifyBases(vault, keys, () => s, (n) => (s = n), { rate: 0 });
  return s;
}

/** The background check while a desktop runs: low priority, throttled (CARRYON_VERIFY_RATE). */
export function verifyInBackground(vault: DesktopRecords, keys: DesktopKeys, current: () => DesktopState, update: (s: DesktopState) => void, opts: { signal: AbortSignal; log: (l: string) => void; stop: () => Promise<void> }): Promise<void> {
  return verifyBases(vault, keys, current, update, { always: true, rate: verifyRate(), signal: opts.signal, stop: opts.stop }).then(
    () => undefined,
    (err: unknown) => {
      if (err instanceof CarryonError && err.code === 'base-damaged') {
        opts.log(err.message);
      } else if (!opts.signal.aborted) {
        opts.log(`the background check of the base layers stopped: ${(err as Error).message}`);
      }
    },
  );
}
