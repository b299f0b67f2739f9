import { open } from 'node:fs/promises';
import { COMPRESSED, COPIED, EXTENDED_L2, OFFSET_MASK, readQcow2Header, readWords, UnsupportedImage, nonZeroEntries } from './qcow2-format.js';

/**
 * Unmaps every chunk of a base layer (cluster = chunk) that is not in `keep`, and frees the
 * clusters they used: a parked base taken over by a new check-out (client/parked.ts), whose
 * chunks that differ from the new checkpoint must read as holes (or from the remote backing
 * `run`/`serve` give an incomplete base), never as the old bytes. Only qcow2 metadata is touched,
 * so no key is needed. QEMU's order for freeing: the L2 entries go (synced) before the refcounts
 * drop (synced), so a kill leaves at worst leaked clusters, never a mapping to a free cluster.
 * Returns how many chunks were unmapped. Refuses (UnsupportedImage) what the Node base writer
 * refuses too.
 */
export async function unmapChunksExcept(path: string, chunkSize: number, keep: ReadonlySet<number>): Promise<number> {
  const fh = await open(path, 'r+');
  try {
    const h = await readQcow2Header(fh, path);
    const unsupported = (why: string) => new UnsupportedImage(`${path}: ${why}`);
    if (h.hasBacking) throw unsupported('it has a backing file');
    if (h.clusterSize !== chunkSize) throw unsupported(`cluster size ${h.clusterSize} is not the chunk size ${chunkSize}`);
    if (h.snapshots !== 0) throw unsupported('it has internal snapshots');
    if ((h.incompatible & ~EXTENDED_L2) !== 0n) throw unsupported(`incompatible features 0x${h.incompatible.toString(16)}`);
    if (h.refcountOrder !== 4) throw unsupported(`${2 ** h.refcountOrder}-bit refcounts`);
    // Extended L2: 16-byte entries, the second word the subclusters' bitmap (cleared with the first: the chunk reads as a hole).
    const entryBytes = (h.incompatible & EXTENDED_L2) !== 0n ? 16 : 8;
    const entries = h.clusterSize / entryBytes;
    const l1 = await readWords(fh, h.l1Offset, h.l1Size);
    const freed: number[] = [];
    let unmapped = 0;
    for (let i1 = 0; i1 < l1.length; i1++) {
      const at = Number(l1[i1]! & OFFSET_MASK);
      if (at === 0) continue;
      const table = Buffer.alloc(h.clusterSize);
      await fh.read(table, 0, table.length, at);
      let changed = false;
      for (const j of nonZeroEntries(table, entryBytes)) {
        const e = table.readBigUInt64BE(j * entryBytes);
        const bitmap = entryBytes === 16 ? table.readBigUInt64BE(j * entryBytes + 8) : 0n;
        if ((e === 0n && bitmap === 0n) || keep.has(i1 * entries + j)) continue;
        table.fill(0, j * entryBytes, (j + 1) * entryBytes);
        changed = true;
        unmapped++;
        const host = Number(e & OFFSET_MASK);
        // Only a cluster this entry alone used (refcount 1) is freed; anything else stays counted (a leak).
        if (host !== 0 && !(e & COMPRESSED) && e & COPIED) freed.push(host);
      }
      if (changed) await fh.write(table, 0, table.length, at);
    }
    if (unmapped === 0) return 0;
    await fh.datasync();
    if (freed.length) {
      const refTable = await readWords(fh, h.refTableOffset, (h.refTableClusters * h.clusterSize) / 8);
      const perBlock = h.clusterSize / 2;
      const blocks = new Map<number, { at: number; block: Buffer }>();
      for (const host of freed) {
        const cluster = host / h.clusterSize;
        const rt = Math.floor(cluster / perBlock);
        const at = Number((refTable[rt] ?? 0n) & OFFSET_MASK);
        if (at === 0) continue;
        let b = blocks.get(rt);
        if (!b) {
          b = { at, block: Buffer.alloc(h.clusterSize) };
          await fh.read(b.block, 0, b.block.length, at);
          blocks.set(rt, b);
        }
        const i = (cluster % perBlock) * 2;
        if (b.block.readUInt16BE(i) === 1) b.block.writeUInt16BE(0, i);
      }
      for (const { at, block } of blocks.values()) await fh.write(block, 0, block.length, at);
      await fh.datasync();
    }
    return unmapped;
  } finally {
    await fh.close();
  }
}
