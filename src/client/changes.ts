import type { ChunkId } from '../core/chunk-id.js';
import { computeChunkId } from '../core/chunk-id.js';
import { sealChunk } from '../core/blob.js';
import { chunkLength, isZero } from '../core/chunking.js';
import { pagesByChunk, sealDeltaRanges, type Range } from '../core/delta.js';
import type { LineageKeys } from '../core/keys.js';
import { createManifest, type Manifest } from '../core/manifest.js';
import { mapLimit } from '../store/fs-chunk-store.js';
import type { NbdClient } from '../nbd/client.js';
import type { UploadSource } from '../transfer/client.js';
import type { DesktopDisk } from './disks.js';

/** One disk as check-in reads it: the chain, through its top export, and the top layer's allocated extents. */
export interface DiskReader {
  disk: DesktopDisk;
  top: NbdClient;
  extents: { start: number; length: number }[];
}

export interface Changes {
  manifests: { name: string; manifest: Manifest }[];
  /** Distinct new chunk IDs, each with where to read it (and its bytes, kept while the budget lasts). */
  changed: Map<ChunkId, { reader: DiskReader; index: number; pages: Range[]; plain?: Buffer }>;
  changedChunks: number;
  source: UploadSource;
}

/**
 * The change since the checkpoint, from the top layer's allocated extents only (a check-in never
 * rescans the disk): each touched chunk is read through the chain and identified (HMAC); a chunk
 * that reads as before (rewritten with the same bytes) is no change, one that reads as zeros
 * becomes a hole. Frames are sealed later, when the server says it lacks them.
 */
export async function collectChanges(readers: DiskReader[], keys: LineageKeys): Promise<Changes> {
  const manifests: Changes['manifests'] = [];
  const changed: Changes['changed'] = new Map();
  let changedChunks = 0;
  let kept = 0;
  for (const reader of readers) {
    const { base } = reader.disk;
    const chunks = base.chunks.slice();
    const extents = reader.extents.map((e) => ({ offset: e.start, length: e.length }));
    const written = pagesByChunk(extents, base.chunkSize, base.diskSize);
    await mapLimit([...written.keys()], 8, async (index) => {
      const plain = await readChunk(reader.top, base, index);
      const id = isZero(plain) ? null : computeChunkId(keys.idKey, plain);
      if (id === base.chunks[index]) return;
      chunks[index] = id;
      changedChunks++;
      if (!id || changed.has(id)) return;
      // The chain is open read-only and locked (no VM runs it): bytes read now are the bytes to send.
      const keep = kept + plain.length <= KEEP_BYTES;
      if (keep) kept += plain.length;
      changed.set(id, { reader, index, pages: written.get(index)!, plain: keep ? plain : undefined });
    });
    manifests.push({ name: reader.disk.name, manifest: createManifest(base.chunkSize, base.diskSize, chunks) });
  }
  return { manifests, changed, changedChunks, source: { frame: (id, useDelta) => frameFor(changed, keys, id, useDelta) } };
}

/** Changed chunks kept in memory between the scan and the upload (the rest is read again). */
const KEEP_BYTES = 256 * 1024 * 1024;

function readChunk(client: NbdClient, m: Manifest, index: number): Promise<Buffer> {
  return client.read(index * m.chunkSize, chunkLength(index, m.diskSize, m.chunkSize));
}

async function frameFor(changed: Changes['changed'], keys: LineageKeys, id: ChunkId, useDelta: boolean): Promise<{ frame: Buffer; delta: boolean }> {
  const { blobFrame, deltaFrame } = await import('../transfer/frames.js');
  const at = changed.get(id);
  if (!at) throw new Error(`chunk ${id} is not among this check-in's changes`);
  const { reader, index } = at;
  let plain = at.plain;
  at.plain = undefined; // sent once; a resend reads it again
  if (!plain) {
    plain = await readChunk(reader.top, reader.disk.base, index);
    // Never send bytes under the wrong ID, whatever happened to the file since the scan.
    if (computeChunkId(keys.idKey, plain) !== id) throw new Error(`chunk ${index} of ${reader.disk.name} changed during the upload; run it again`);
  }
  // The pages written since the checkpoint are the top layer's allocated ones: every other page
  // reads through to the base, so the delta needs no read of the base (the receiver rebuilds the
  // chunk from its copy of the base and checks the result against the ID).
  const baseId = reader.disk.base.chunks[index];
  if (useDelta && baseId && at.pages.length > 0) {
    const delta = sealDeltaRanges(keys, id, baseId, plain, at.pages);
    if (delta) return { frame: deltaFrame(id, baseId, delta), delta: true };
  }
  return { frame: blobFrame(id, sealChunk(keys, plain, id).blob), delta: false };
}
