import { open } from 'node:fs/promises';
import { COMPRESSED, COPIED, EXTENDED_L2, l2EntryBytes, OFFSET_MASK, readQcow2Header, readWords, UnsupportedImage, nonZeroEntries } from './qcow2-format.js';

/**
 * The guest byte ranges a qcow2 layer holds itself (data, zeros it wrote, compressed clusters),
 * as `qemu-img map` calls them "present" for the layer alone: read from its L1 and L2 tables
 * without starting `qemu-img` (a check-in of one chunk spent ≈ 25 ms in that process, on the
 * cores the rest of the check-in needs). Sorted, adjacent ranges merged.
 *
 * Only what this parser fully knows: qcow2 v3 (LUKS, as every layer here), extended L2 or not,
 * no other incompatible feature (dirty, corrupt, external data file, compression type), no
 * internal snapshot; anything else throws `UnsupportedImage` and the caller asks `qemu-img map`. Like
 * `qemu-img map -U`, it reads the file as it is: a QEMU writing it may hold newer L2 tables in
 * its cache (check-ins read stopped or frozen layers).
 */
export async function presentRanges(path: string): Promise<{ offset: number; length: number }[]> {
  const fh = await open(path, 'r');
  try {
    const h = await readQcow2Header(fh, path);
    if ((h.incompatible & ~EXTENDED_L2) !== 0n) throw new UnsupportedImage(`${path}: incompatible features 0x${h.incompatible.toString(16)}`);
    if (h.snapshots !== 0) throw new UnsupportedImage(`${path}: it has internal snapshots`);
    // Extended L2 (the tops'): 16-byte entries, each cluster in 32 subclusters with an "allocated" and a "reads as zeros" bit.
    const extended = (h.incompatible & EXTENDED_L2) !== 0n;
    const entry = l2EntryBytes(h);
    const perTable = h.clusterSize / entry;
    const sub = extended ? h.clusterSize / 32 : h.clusterSize;
    const l1 = await readWords(fh, h.l1Offset, h.l1Size);
    const out: { offset: number; length: number }[] = [];
    const add = (offset: number, length: number) => {
      if (offset < h.diskSize) appendRange(out, offset, Math.min(length, h.diskSize - offset));
    };
    const table = Buffer.allocUnsafe(h.clusterSize);
    for (let i1 = 0; i1 < l1.length; i1++) {
      const at = Number(l1[i1]! & OFFSET_MASK);
      if (at === 0) continue;
      const { bytesRead } = await fh.read(table, 0, table.length, at);
      if (bytesRead !== table.length) throw new UnsupportedImage(`${path}: L2 table ${i1} lies past the end of the file`);
      for (const j of nonZeroEntries(table, entry)) {
        const cluster = (i1 * perTable + j) * h.clusterSize;
        if (cluster >= h.diskSize) break;
        const word = table.readBigUInt64BE(j * entry);
        if (!extended || word & COMPRESSED) {
          // Anything but an empty entry (COPIED alone says nothing) is this layer's: data, "reads as zeros", compressed.
          if ((word & ~COPIED) !== 0n) add(cluster, h.clusterSize);
          continue;
        }
        // Allocated (bits 0–31) or reading as zeros (bits 32–63): either way this layer's, not the backing's.
        const bitmap = table.readBigUInt64BE(j * entry + 8);
        const present = Number((bitmap | (bitmap >> 32n)) & 0xffff_ffffn);
        if (present === 0) continue;
        for (let k = 0; k < 32; k++) if (present & (1 << k)) add(cluster + k * sub, sub);
      }
    }
    return out;
  } finally {
    await fh.close();
  }
}

/** Appends [offset, offset + length) to sorted `out`, joined to the last range where they meet. */
export function appendRange(out: { offset: number; length: number }[], offset: number, length: number): void {
  const last = out[out.length - 1];
  if (last && last.offset + last.length === offset) last.length += length;
  else out.push({ offset, length });
}
