import { open, type FileHandle } from 'node:fs/promises';
import { DiskError } from '../block-device.js';
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
  /** Where the backing file's name lies and its length (both 0 without one). */
  backingName: { offset: number; length: number };
  l1Size: number;
  l1Offset: number;
  refTableOffset: number;
  refTableClusters: number;
  snapshots: number;
  incompatible: bigint;
  refcountOrder: number;
}

/** Bytes per L2 entry: 16 with extended L2 (host offset, then the subclusters' bitmap), else 8. */
export function l2EntryBytes(h: Pick<Qcow2Header, 'incompatible'>): 8 | 16 {
  return (h.incompatible & EXTENDED_L2) !== 0n ? 16 : 8;
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
    backingName: { offset: Number(h.readBigUInt64BE(8)), length: h.readUInt32BE(16) },
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
  // A LUKS1 header with eight slots' key material is ≈ 2 MiB; a header asking for more was not made by QEMU.
  if (range.length > 16 * 1024 * 1024) throw new DiskError('state', `${path}: a LUKS header of ${range.length} bytes`);
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
  for (const i of nonZeroEntries(buf, 8)) out[i] = buf.readBigUInt64BE(i * 8);
  return out;
}

const ZERO_BLOCK = Buffer.alloc(4096);

/**
 * Indexes of the `entryBytes`-sized entries of `table` that are not all zeros. Tables are mostly
 * empty entries (a 4 GiB base's refcount table has 32768, a handful used; a top's L2 tables are
 * empty where the guest did not write): whole 4 KiB runs of zeros are skipped in one native
 * compare, and no BigInt is made for an empty entry (one per entry cost ≈ 10 ms of every command
 * that measures or opens a layer).
 */
export function nonZeroEntries(table: Buffer, entryBytes: 8 | 16): number[] {
  const out: number[] = [];
  for (let block = 0; block < table.length; block += ZERO_BLOCK.length) {
    const end = Math.min(table.length, block + ZERO_BLOCK.length);
    if (table.compare(ZERO_BLOCK, 0, end - block, block, end) === 0) continue;
    for (let at = block; at + entryBytes <= end; at += entryBytes) {
      for (let w = at; w < at + entryBytes; w += 4) {
        if (table.readUInt32BE(w) !== 0) {
          out.push(at / entryBytes);
          break;
        }
      }
    }
  }
  return out;
}

/**
 * Where qcow2 keeps its LUKS header: the "full disk encryption header pointer" extension. Reads
 * through `file` when it is an open handle (left open), else opens the path for the read.
 */
export async function luksHeaderRange(file: string | FileHandle): Promise<{ offset: number; length: number } | null> {
  const fh = typeof file === 'string' ? await open(file, 'r') : file;
  try {
    const head = Buffer.alloc(64 * 1024);
    const { bytesRead } = await fh.read(head, 0, head.length, 0);
    if (bytesRead < 104 || head.readUInt32BE(0) !== 0x514649fb || head.readUInt32BE(4) < 3) return null;
    let off = head.readUInt32BE(100);
    while (off + 8 <= bytesRead) {
      const type = head.readUInt32BE(off);
      const len = head.readUInt32BE(off + 4);
      if (type === 0) return null;
      if (type === 0x0537be77 && len >= 16) return { offset: Number(head.readBigUInt64BE(off + 8)), length: Number(head.readBigUInt64BE(off + 16)) };
      off += 8 + Math.ceil(len / 8) * 8;
    }
    return null;
  } finally {
    if (typeof file === 'string') await fh.close();
  }
}

/** Incompatible feature bit 4: extended L2 entries (subclusters), which Carryon's tops use (and session 13's bases did). */
export const EXTENDED_L2 = 1n << 4n;

/** The backing file name header `h` names (the image has one: `hasBacking`). */
export async function readBackingName(fh: FileHandle, path: string, h: Qcow2Header): Promise<string> {
  const { offset, length } = h.backingName;
  // QEMU's own bound (1023 bytes); past it the header is not one QEMU wrote.
  if (length === 0 || length > 1023) throw new UnsupportedImage(`${path}: a backing file name of ${length} bytes`);
  const name = Buffer.alloc(length);
  const { bytesRead } = await fh.read(name, 0, length, offset);
  if (bytesRead !== length) throw new UnsupportedImage(`${path}: its backing file name lies past the end of the file`);
  return name.toString('utf8');
}
