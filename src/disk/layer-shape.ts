import { createHash, type Hash } from 'node:crypto';
import { open, type FileHandle } from 'node:fs/promises';
import { luksHeaderRange, nonZeroEntries, OFFSET_MASK } from './qcow2/qcow2-format.js';

/**
 * A qcow2 layer's shape: its file size and a SHA-256 over its structure — the header cluster
 * (header, extensions, backing name), the LUKS header, the L1 table and every L2 table it maps,
 * the refcount table and every refcount block. Data clusters are not read: the shape says where
 * every guest cluster lives and with which keys, not what it holds.
 *
 * Bound to the vault's MACed state at each clean close, it makes every edit of the structure
 * (a header field, a table entry, a truncation, one layer put in the other's place) visible at
 * the next open. Cheap: on a 16 GiB desktop the metadata is a few MiB (BENCHMARKS in the notes).
 *
 * Never throws on a damaged image: what cannot be parsed is hashed as it is (with a marker), so
 * it simply fails to match.
 */
export interface LayerShapeRecord {
  size: number;
  sha256: string;
}

/** Bounds for tables read from an untrusted header: a 64 TiB disk stays far below them. */
const MAX_TABLE_BYTES = 64 << 20;

/**
 * `withoutLuks`: the LUKS header left out (a parked base whose key slots change while it is
 * handed over, client/parked.ts; there the old passphrase opening it vouches for the header).
 */
export async function measureLayer(path: string, opts: { withoutLuks?: boolean } = {}): Promise<LayerShapeRecord> {
  const fh = await open(path, 'r');
  try {
    const { size } = await fh.stat();
    // Both digests in one read: a parked base's record (without LUKS) is taken from the same measure.
    const twin = new TwinHash();
    await hashStructure(fh, size, twin);
    const full = { size, sha256: twin.full.digest('hex') };
    const bare = { size, sha256: twin.bare.digest('hex') };
    if (opts.withoutLuks) return bare;
    withoutLuksOf.set(full, bare);
    return full;
  } finally {
    await fh.close();
  }
}

const withoutLuksOf = new WeakMap<LayerShapeRecord, LayerShapeRecord>();

/**
 * The same layer's shape without its LUKS header, measured with `shape` (which this process's
 * `measureLayer` returned), or undefined: the structure as it was then, not read again.
 */
export function shapeWithoutLuks(shape: LayerShapeRecord | null | undefined): LayerShapeRecord | undefined {
  return shape ? withoutLuksOf.get(shape) : undefined;
}

/** The two digests of a layer: of its whole structure, and without the LUKS header's bytes. */
class TwinHash {
  readonly full: Hash = createHash('sha256');
  readonly bare: Hash = createHash('sha256');
  update(data: string | Buffer, fullOnly = false): void {
    this.full.update(data);
    if (!fullOnly) this.bare.update(data);
  }
}

async function hashStructure(fh: FileHandle, size: number, hash: TwinHash): Promise<void> {
  const note = (what: string, fullOnly = false) => hash.update(`\0${what}\0`, fullOnly);
  const h = Buffer.alloc(104);
  const { bytesRead } = await fh.read(h, 0, h.length, 0);
  if (bytesRead < h.length || h.readUInt32BE(0) !== 0x514649fb) {
    note('not-qcow2');
    hash.update(h.subarray(0, bytesRead));
    return;
  }
  const clusterBits = h.readUInt32BE(20);
  if (clusterBits < 9 || clusterBits > 21) {
    note('cluster-bits');
    hash.update(h);
    return;
  }
  const clusterSize = 2 ** clusterBits;
  // The LUKS header's region: its name in both digests, its bytes (or their absence) in the full one only.
  const region = async (what: string, at: number, length: number): Promise<Buffer | null> => {
    const fullOnly = what === 'luks';
    note(`${what}@${at}+${length}`);
    if (!Number.isSafeInteger(at) || at < 0 || length < 0 || length > MAX_TABLE_BYTES || at + length > size) {
      note('out-of-bounds', fullOnly);
      return null;
    }
    const buf = Buffer.alloc(length);
    const got = (await fh.read(buf, 0, length, at)).bytesRead;
    hash.update(buf.subarray(0, got), fullOnly);
    return buf;
  };
  // The header cluster holds the header, its extensions and the backing file name.
  await region('header', 0, Math.min(clusterSize, size));
  const luks = await luksHeaderRange(fh).catch(() => null);
  if (luks) await region('luks', luks.offset, luks.length);
  const l1 = await region('l1', Number(h.readBigUInt64BE(40)), h.readUInt32BE(36) * 8);
  if (l1) await tablesOf(l1, (at) => region('l2', at, clusterSize));
  const refTable = await region('refcount-table', Number(h.readBigUInt64BE(48)), h.readUInt32BE(56) * clusterSize);
  if (refTable) await tablesOf(refTable, (at) => region('refcount-block', at, clusterSize));
  if (h.readUInt32BE(60) !== 0) await region('snapshots', Number(h.readBigUInt64BE(64)), Math.min(clusterSize, size));
}

/** Each table a table of 64-bit entries points to, in order. */
async function tablesOf(table: Buffer, read: (at: number) => Promise<unknown>): Promise<void> {
  for (const i of nonZeroEntries(table, 8)) {
    const at = Number(table.readBigUInt64BE(i * 8) & OFFSET_MASK);
    if (at !== 0) await read(at);
  }
}
