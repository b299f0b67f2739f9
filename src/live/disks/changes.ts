import type { ChunkId } from '../../core/chunk-id.js';
import { chunkLength } from '../../core/chunks/chunking.js';
import { pagesByChunk, pagesFingerprint, sealPages, type Range } from '../../core/chunks/delta.js';
import type { LineageKeys } from '../../core/keys.js';
import { withChanges, type Manifest } from '../../core/chunks/manifest.js';
import { pagesFrameHead } from '../../core/chunks/frames.js';
import type { PagesSource } from '../../transfer-client/push-pages.js';
import type { DesktopDisk } from './disks.js';
import type { PushJournal } from './push-journal.js';

/** What reading changes needs of a disk: its name and checkpoint manifest (a host's disk is one too, host/send-back.ts). */
export type ReadDisk = Pick<DesktopDisk, 'name' | 'base'>;

/** Reads guest bytes the top holds (an NBD export of the chain, or the stopped top read from Node: Qcow2Reader). */
export interface TopBytes {
  read(offset: number, length: number): Promise<Buffer>;
}

/** One disk as check-in reads it: the top layer's bytes and its allocated extents. */
export interface DiskReader<D extends ReadDisk = DesktopDisk> {
  disk: D;
  top: TopBytes;
  extents: Range[];
}

/** A chunk with pages written since the checkpoint. */
export interface ChangedChunk {
  reader: DiskReader<ReadDisk>;
  index: number;
  /** The written pages (the top layer's allocated ones), relative to the chunk. */
  pages: Range[];
  length: number;
}

/**
 * The chunks touched since the checkpoint, from the top layer's allocated extents alone: nothing
 * is read. Each is sent as its written pages and named by the transfer server (push-pages), so
 * a check-in reads only what the user wrote, never the unchanged rest of a chunk from the base.
 */
export function touchedChunks(readers: DiskReader<ReadDisk>[]): ChangedChunk[] {
  const out: ChangedChunk[] = [];
  for (const reader of readers) {
    const { chunkSize, diskSize } = reader.disk.base;
    for (const [index, pages] of pagesByChunk(reader.extents, chunkSize, diskSize)) out.push({ reader, index, pages, length: chunkLength(index, diskSize, chunkSize) });
  }
  return out;
}

/**
 * Frames for `chunks`, read through the chain while the upload runs. The chain is open read-only
 * and locked (no VM runs it), so bytes read now are the bytes of the check-in. Pages a server
 * named in an earlier attempt (`journal`) are not sent again.
 */
export function pagesSource(chunks: readonly ChangedChunk[], keys: LineageKeys, journal?: PushJournal): PagesSource {
  const fingerprints = new Map<number, string>();
  return {
    async frame(tag, whole) {
      const c = chunks[tag];
      if (!c) throw new Error(`no changed chunk #${tag}`);
      const { top, disk } = c.reader;
      const at = c.index * disk.base.chunkSize;
      const all = whole || (c.pages.length === 1 && c.pages[0]!.offset === 0 && c.pages[0]!.length === c.length);
      // A chunk rewritten whole needs no base; nor does one whose checkpoint chunk was a hole (zeros).
      const baseId = all ? null : disk.base.chunks[c.index] ?? null;
      const pieces = all
        ? [{ offset: 0, bytes: await top.read(at, c.length) }]
        : await Promise.all(c.pages.map(async (r) => ({ offset: r.offset, bytes: await top.read(at + r.offset, r.length) })));
      if (journal) {
        const fingerprint = pagesFingerprint(keys.idKey, baseId, c.length, pieces);
        const known = journal.get(fingerprint);
        if (known !== undefined) return known ? { known: known.id, receipt: known.receipt } : { known: null };
        fingerprints.set(tag, fingerprint);
      }
      const blob = sealPages(keys, baseId, c.length, pieces);
      return { parts: [pagesFrameHead(tag, baseId, blob.length), blob] };
    },
    async remember(names) {
      await journal?.add(names.flatMap((n) => {
        const fingerprint = fingerprints.get(n.tag);
        if (!fingerprint || (n.id && !n.receipt)) return [];
        return [{ fingerprint, name: n.id ? { id: n.id, receipt: n.receipt! } : null }];
      }));
    },
  };
}

export interface Outcome {
  /** Per disk, what the commit sends: chunk index → new ID (null: a hole). */
  changes: DiskChanges[];
  /** Chunks whose content changed (rewritten with the same bytes: no change). */
  changedChunks: number;
}

export interface DiskChanges {
  name: string;
  changes: [number, ChunkId | null][];
}

/** What the transfer server's names for `chunks` (by tag) change, per disk. */
export function namedOutcome(readers: DiskReader<ReadDisk>[], chunks: readonly ChangedChunk[], named: ReadonlyMap<number, ChunkId | null>): Outcome {
  const out: Outcome = { changes: [], changedChunks: 0 };
  for (const reader of readers) {
    const { base } = reader.disk;
    const changes: [number, ChunkId | null][] = [];
    chunks.forEach((c, tag) => {
      if (c.reader !== reader) return;
      if (!named.has(tag)) throw new Error(`chunk ${c.index} of ${reader.disk.name} was not named by the transfer server`);
      const id = named.get(tag)!;
      if (id !== base.chunks[c.index]) changes.push([c.index, id]);
    });
    out.changedChunks += changes.length;
    if (changes.length) out.changes.push({ name: reader.disk.name, changes });
  }
  return out;
}

/** The disks' manifests with `changes` applied: what the broker records (a replica's, the laptop's next base). */
export function changedManifests(disks: readonly DesktopDisk[], changes: readonly DiskChanges[]): { name: string; manifest: Manifest }[] {
  return disks.map(({ name, base }) => ({ name, manifest: withChanges(base, changes.find((d) => d.name === name)?.changes ?? []) }));
}
