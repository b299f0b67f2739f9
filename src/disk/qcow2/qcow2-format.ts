import type { FileHandle } from 'node:fs/promises';
import { DiskError } from '../block-device.js';
import { luksHeaderRange } from '../layer-template.js';
import { openAnyLuksSlot } from '../luks-header.js';

/**
 * The parts of the qcow2 format (QEMU's docs/interop/qcow2.txt) that the Node base writer uses:
 * the header, L1/L2 entries, and the LUKS volume key of a layer.
 */

/** The image is not one the Node code handles (the caller goes through QEMU instead). */
export class UnsupportedImage extends DiskError {
  constructor(message: string) {
    super('state', message);
  }
}

export const COPIED = 1n << 63n;
export const COMPRESSED = 1n << 62n;
/** Host offset bits of L1 and standard L2 entries (9–55). */
export const OFFSET_MASK = 0x00ff_ffff_ffff_fe00n;

export interface Qcow2Header {
  clusterSize: number;
  diskSize: number;
  hasBacking: boolean;
  l1Size: number;
  l1Offset: number;
  refTableOffset: number;
  refTableClusters: number;
  snapshots: number;
  incompatible: bigint;
  refcountOrder: number;
}

/** Reads and checks the header: qcow2 v3, LUKS-encrypted (anything else is unsupported). */
export async function readQcow2Header(fh: FileHandle, path: string): Promise<Qcow2Header> {
  const h = Buffer.alloc(104);
  const { bytesRead } = await fh.read(h, 0, h.length, 0);
  if (bytesRead < h.length || h.readUInt32BE(0) !== 0x514649fb) throw new UnsupportedImage(`${path}: not a qcow2 image`);
  if (h.readUInt32BE(4) !== 3) throw new UnsupportedImage(`${path}: qcow2 version ${h.readUInt32BE(4)}`);
  if (h.readUInt32BE(32) !== 2) throw new UnsupportedImage(`${path}: not LUKS-encrypted`);
  return {
    clusterSize: 2 ** h.readUInt32BE(20),
    diskSize: Number(h.readBigUInt64BE(24)),
    hasBacking: h.readBigUInt64BE(8) !== 0n,
    l1Size: h.readUInt32BE(36),
    l1Offset: Number(h.readBigUInt64BE(40)),
    refTableOffset: Number(h.readBigUInt64BE(48)),
    refTableClusters: h.readUInt32BE(56),
    snapshots: h.readUInt32BE(60),
    incompatible: h.readBigUInt64BE(72),
    refcountOrder: h.readUInt32BE(96),
  };
}

/** The 64-byte AES-256-XTS volume key of a LUKS qcow2 layer, opened with its passphrase. */
export async function layerVolumeKey(fh: FileHandle, path: string, passphrase: string): Promise<Buffer> {
  const range = await luksHeaderRange(fh);
  if (!range) throw new UnsupportedImage(`${path}: no LUKS header`);
  const luks = Buffer.alloc(range.length);
  await fh.read(luks, 0, luks.length, range.offset);
  // Any active slot: a parked base being re-keyed (client/parked.ts) holds its new passphrase in another slot for a while.
  const key = openAnyLuksSlot(luks, Buffer.from(passphrase, 'utf8'))?.key;
  if (!key) throw new DiskError('state', `${path}: the passphrase does not open its LUKS header`);
  return key;
}

/** `count` big-endian 64-bit entries at `at` (an L1 or refcount table). */
export async function readWords(fh: FileHandle, at: number, count: number): Promise<BigUint64Array> {
  const buf = Buffer.alloc(count * 8);
  const { bytesRead } = await fh.read(buf, 0, buf.length, at);
  if (bytesRead !== buf.length) throw new DiskError('state', `qcow2 table at ${at} lies past the end of the file`);
  const out = new BigUint64Array(count);
  for (let i = 0; i < count; i++) out[i] = buf.readBigUInt64BE(i * 8);
  return out;
}
