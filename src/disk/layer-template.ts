import { randomBytes } from 'node:crypto';
import { copyFile, mkdir, open, rename, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { DiskError } from './block-device.js';
import { rekeyLuksHeader } from './luks-header.js';
import { EXTENDED_L2, l2EntryBytes, luksHeaderRange, readBackingName, readQcow2Header } from './qcow2/qcow2-format.js';
import { runQemuTool, SECRET_FD_OBJECT } from '../qemu/qemu-tools.js';

/**
 * Empty LUKS qcow2 layers made by copying a template and giving the copy fresh keys (see
 * luks-header.ts for why): a layer costs milliseconds instead of QEMU's ≈ 2 s PBKDF benchmark.
 * Templates hold no data and no secret that survives the re-keying; one per layer shape,
 * made once per laptop by qemu-img (at enrollment, or on first need).
 */

export type LayerKind = 'base' | 'top';
export interface LayerShape {
  kind: LayerKind;
  clusterSize: number;
}

/** A template is made small; each copy is resized to its disk. */
const TEMPLATE_SIZE = 1 << 20;
const SECRET_ID = 'sec0';

export function templatePath(dir: string, shape: LayerShape): string {
  return join(dir, `${shape.kind}-${shape.clusterSize}.qcow2`);
}

/**
 * Bases are made without extended L2 (subclusters); tops with. A base is filled by QEMU's
 * copy-on-read while a VM or `serve` reads a desktop still arriving, and QEMU 7.2 aborts a
 * copy-on-read that starts past the first run of a cluster whose subclusters differ (data beside
 * zeros: block/io.c, bdrv_co_do_copy_on_readv, "skip_bytes < pnum"; fixed upstream in 8.2 by
 * aligning such requests to subclusters). Session 13 made bases with them (decision 69) and a
 * serve taking over a check-out crashed now and then; see `copyOnReadSafe`.
 */
const SUBCLUSTERS_IN: Record<LayerKind, boolean> = { base: false, top: true };

export function createArgs(path: string, sizeBytes: number, shape: LayerShape): string[] {
  const o = ['encrypt.format=luks', `encrypt.key-secret=${SECRET_ID}`, 'encrypt.iter-time=10', `cluster_size=${shape.clusterSize}`, `extended_l2=${SUBCLUSTERS_IN[shape.kind] ? 'on' : 'off'}`].join(',');
  const args = ['create', '-q', '-f', 'qcow2', '--object', SECRET_FD_OBJECT(SECRET_ID), '-o', o];
  // The top names its base by file name only (relative, so the vault can move as a whole).
  if (shape.kind === 'top') args.push('-u', '-b', 'base.qcow2', '-F', 'qcow2');
  return [...args, path, String(sizeBytes)];
}

/** QEMU's PBKDF benchmark fails now and then on a busy machine ("Unable to get accurate CPU usage"): try again. */
export async function createWithQemu(args: string[], secret: string): Promise<void> {
  for (let attempt = 1; ; attempt++) {
    try {
      await runQemuTool('qemu-img', args, { secret });
      return;
    } catch (err) {
      // Tick-based CPU accounting often reads 0 ms for its first short round when the machine is busy: each try is cheap.
      if (attempt >= 40 || !/accurate CPU usage/.test((err as { stderr?: string }).stderr ?? '')) throw err;
      await new Promise((r) => setTimeout(r, 20 + Math.random() * 80));
    }
  }
}

/**
 * The template for `shape`, made if missing. An existing one is checked before use (the home
 * is the laptop owner's to edit): exactly the expected shape, no data file, no other backing.
 */
export async function ensureTemplate(dir: string, shape: LayerShape): Promise<string> {
  const path = templatePath(dir, shape);
  try {
    await checkTemplate(path, shape);
    return path;
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'ENOENT' && !(err instanceof DiskError)) throw err;
  }
  await mkdir(dir, { recursive: true, mode: 0o700 });
  const tmp = `${path}.${process.pid}.${randomBytes(4).toString('hex')}.new`;
  try {
    // The template's own passphrase is thrown away: every copy is re-keyed.
    await createWithQemu(createArgs(tmp, TEMPLATE_SIZE, shape), randomBytes(32).toString('base64'));
    await rename(tmp, path);
  } finally {
    await rm(tmp, { force: true });
  }
  return path;
}

async function checkTemplate(path: string, shape: LayerShape): Promise<void> {
  // Read by our own parser, not `qemu-img info` (a process start per layer made, ≈ 15 ms): the
  // header fields QEMU would report, refused the same way when they are not a template's.
  const fh = await open(path, 'r'); // ENOENT: make it
  try {
    const h = await readQcow2Header(fh, path); // qcow2 v3 with LUKS, else UnsupportedImage (a DiskError: made again)
    const luks = await luksHeaderRange(fh);
    const backing = h.hasBacking ? await readBackingName(fh, path, h) : null;
    // The only incompatible feature a template may use: a top's extended L2 entries (no data file, no dirty bit).
    // A base template of session 13 has them: it is made again (see SUBCLUSTERS_IN).
    const ok = luks !== null && h.clusterSize === shape.clusterSize && h.incompatible === (SUBCLUSTERS_IN[shape.kind] ? EXTENDED_L2 : 0n) && h.snapshots === 0 &&
      (shape.kind === 'top' ? backing === 'base.qcow2' : backing === null);
    if (!ok) throw new DiskError('state', `layer template ${path} is not a ${shape.kind} template: it is made again`);
  } finally {
    await fh.close();
  }
}

/**
 * Whether QEMU 7.2 may fill the base at `path` by copy-on-read (a VM or `serve` reading a desktop
 * still arriving): not one with extended L2 entries (see SUBCLUSTERS_IN). A file that is not a
 * qcow2 Carryon knows is left to the checks that follow (true here).
 */
export async function copyOnReadSafe(path: string): Promise<boolean> {
  const fh = await open(path, 'r');
  try {
    const h = await readQcow2Header(fh, path).catch(() => null);
    return h === null || (h.incompatible & EXTENDED_L2) === 0n;
  } finally {
    await fh.close();
  }
}

/** Replaces every secret of the LUKS header inside qcow2 file `path`: it now opens with `passphrase` only. */
export async function rekeyImage(path: string, passphrase: Buffer): Promise<void> {
  const range = await luksHeaderRange(path);
  if (!range) throw new DiskError('state', `${path} has no LUKS header`);
  const fh = await open(path, 'r+');
  try {
    const current = Buffer.alloc(range.length);
    await fh.read(current, 0, range.length, range.offset);
    const { header, material, layout } = rekeyLuksHeader(current, passphrase);
    if (layout.slotOffset + material.length > range.length) throw new DiskError('state', `${path}: LUKS key slot lies outside its header area`);
    await fh.write(material, 0, material.length, range.offset + layout.slotOffset);
    await fh.write(header, 0, header.length, range.offset);
    await fh.sync();
  } finally {
    await fh.close();
  }
}

/**
 * An empty layer of `shape` and `sizeBytes` at `path` that opens with `secret`: template copied
 * to a temp file, re-keyed, resized, then renamed into place (a kill leaves no half-made layer).
 */
export async function createLayerFromTemplate(templates: string, shape: LayerShape, path: string, sizeBytes: number, secret: string): Promise<void> {
  const template = await ensureTemplate(templates, shape);
  const tmp = `${path}.new`;
  await rm(tmp, { force: true });
  try {
    await copyFile(template, tmp);
    await rekeyImage(tmp, Buffer.from(secret, 'utf8'));
    if (!(await growEmptyLayer(tmp, sizeBytes))) {
      // Opened without its backing: the top's base may not exist yet.
      const filename = `json:${JSON.stringify({ driver: 'qcow2', file: { driver: 'file', filename: tmp }, encrypt: { format: 'luks', 'key-secret': SECRET_ID }, backing: null })}`;
      await runQemuTool('qemu-img', ['resize', '-q', '--object', SECRET_FD_OBJECT(SECRET_ID), filename, String(sizeBytes)], { secret });
    }
    await rename(tmp, path);
  } finally {
    await rm(tmp, { force: true });
  }
}

/**
 * Grows an empty qcow2 layer (a fresh template copy: no cluster mapped) to `sizeBytes` as
 * `qemu-img resize` does, from Node: the header's size, and the L1 table's length where the
 * cluster QEMU allocated for it already has room for the new entries (zeros: nothing mapped).
 * False, with the file untouched, for anything else: the caller runs qemu-img.
 *
 * Why: qemu-img resize (a process, its LUKS key slot opened, plus the FIFO for its secret) cost
 * ≈ 100 ms of CPU per layer here, on the two cores a check-out's transfer is using.
 */
export async function growEmptyLayer(path: string, sizeBytes: number): Promise<boolean> {
  const fh = await open(path, 'r+');
  try {
    const h = await readQcow2Header(fh, path);
    if (!Number.isSafeInteger(sizeBytes) || sizeBytes % 512 !== 0 || sizeBytes < h.diskSize || h.snapshots !== 0) return false;
    if (h.l1Offset % h.clusterSize !== 0) return false;
    const perL1Entry = (h.clusterSize / l2EntryBytes(h)) * h.clusterSize;
    const l1Size = Math.ceil(sizeBytes / perL1Entry);
    // QEMU allocates whole clusters for L1 (at least one): the first is ours to use, no refcount to change.
    if (l1Size * 8 > h.clusterSize) return false;
    const l1 = Buffer.alloc(Math.max(l1Size, h.l1Size) * 8);
    const { bytesRead } = await fh.read(l1, 0, l1.length, h.l1Offset);
    if (bytesRead !== l1.length || l1.some((b) => b !== 0)) return false;
    const fields = Buffer.alloc(16);
    fields.writeBigUInt64BE(BigInt(sizeBytes), 0); // size (offset 24)
    fields.writeUInt32BE(2, 8); // crypt_method: LUKS, as readQcow2Header checked (offset 32)
    fields.writeUInt32BE(Math.max(l1Size, h.l1Size), 12); // l1_size (offset 36)
    const { bytesWritten } = await fh.write(fields, 0, fields.length, 24);
    if (bytesWritten !== fields.length) throw new DiskError('io', `${path}: short write of the qcow2 header`);
    await fh.datasync();
    return true;
  } finally {
    await fh.close();
  }
}
