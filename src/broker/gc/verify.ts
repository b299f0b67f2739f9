import { randomInt } from 'node:crypto';
import { openBlob } from '../../core/chunks/blob.js';
import type { ChunkId } from '../../core/chunk-id.js';
import { unwrapLineageKeys, type LineageKeys } from '../../core/keys.js';
import { decodeManifest, referencedChunks } from '../../core/chunks/manifest.js';
import { getBlobs, type ChunkStore } from '../../store/chunk-store.js';
import type { DesktopRow, MetadataStore, SnapshotRow } from '../db/metadata.js';

/** Blobs read per request (an object store merges neighbours into one ranged GET). */
const WINDOW = 32;

export interface VerifyOptions {
  /** Share of the referenced chunks to read, in percent (100: all). */
  samplePercent: number;
  /** Windows of blobs being read at once. */
  concurrency: number;
}

export interface VerifyReport {
  startedAt: string;
  seconds: number;
  samplePercent: number;
  chunksReferenced: number;
  chunksChecked: number;
  bytesChecked: number;
  /** Damaged or missing blobs (the first 1000). */
  damaged: { id: ChunkId; problem: 'missing' | 'corrupt'; detail: string }[];
  damagedCount: number;
  /** Snapshots that reference a damaged blob or whose manifest is missing or unreadable. */
  damagedSnapshots: { id: string; desktopId: string; desktop: string; kind: string; createdAt: string; badChunks: number; manifestProblem: string | null }[];
  snapshotsChecked: number;
}

/**
 * Scrub, like `restic check --read-data` and PBS verify jobs: reads every blob that a snapshot
 * references (or a random sample), authenticates it (AES-GCM tag over header and ID, then the
 * HMAC of the plaintext must equal the ID) and names the snapshots a damaged blob breaks.
 * Blobs no snapshot references are not read: garbage collection removes them.
 */
export async function verifyStore(meta: MetadataStore, store: ChunkStore, masterKey: Buffer, given: Partial<VerifyOptions> = {}): Promise<VerifyReport> {
  const opts: VerifyOptions = { samplePercent: 100, concurrency: 4, ...given };
  const t0 = Date.now();
  const snapshots = await meta.transaction(async (tx) => {
    const out: { s: SnapshotRow; d: DesktopRow }[] = [];
    for (const d of await tx.listDesktops()) for (const s of await tx.listSnapshots(d.id)) out.push({ s, d });
    return out;
  });
  const keysOf = new Map<string, LineageKeys>();
  const chunkKeys = new Map<ChunkId, LineageKeys>();
  const chunksOf = new Map<string, Set<ChunkId>>();
  const manifestProblem = new Map<string, string>();
  const manifests = new Map<string, Set<ChunkId> | string>();
  for (const { s, d } of snapshots) {
    let keys = keysOf.get(d.lineageId);
    if (!keys) {
      const wrapped = await meta.getLineageKeys(d.lineageId);
      if (!wrapped) {
        manifestProblem.set(s.id, `lineage ${d.lineageId} has no keys`);
        continue;
      }
      keysOf.set(d.lineageId, (keys = unwrapLineageKeys(masterKey, wrapped, `lineage:${d.lineageId}`)));
    }
    const ids = new Set<ChunkId>();
    for (const disk of s.disks) {
      let m = manifests.get(disk.digest);
      if (!m) {
        try {
          const raw = await store.getManifest(disk.digest);
          m = raw ? referencedChunks(decodeManifest(raw)) : `manifest ${disk.digest} is missing`;
        } catch (err) {
          m = `manifest ${disk.digest}: ${(err as Error).message}`;
        }
        manifests.set(disk.digest, m);
      }
      if (typeof m === 'string') manifestProblem.set(s.id, m);
      else for (const id of m) {
        ids.add(id);
        if (!chunkKeys.has(id)) chunkKeys.set(id, keys);
      }
    }
    chunksOf.set(s.id, ids);
  }

  let toCheck = [...chunkKeys.keys()];
  if (opts.samplePercent < 100) {
    const n = Math.min(toCheck.length, Math.max(1, Math.ceil((toCheck.length * opts.samplePercent) / 100)));
    const picked = new Set<number>();
    while (picked.size < n) picked.add(randomInt(toCheck.length));
    // Keep disk order: neighbours in a pack are read together.
    toCheck = [...picked].sort((a, b) => a - b).map((i) => toCheck[i]!);
  }
  const bad = new Map<ChunkId, { problem: 'missing' | 'corrupt'; detail: string }>();
  let bytesChecked = 0;
  const check = (id: ChunkId, blob: Buffer | null) => {
    if (!blob) return void bad.set(id, { problem: 'missing', detail: 'not in the store' });
    bytesChecked += blob.length;
    try {
      openBlob(chunkKeys.get(id)!, id, blob);
    } catch (err) {
      bad.set(id, { problem: 'corrupt', detail: (err as Error).message });
    }
  };
  const windows: ChunkId[][] = [];
  for (let i = 0; i < toCheck.length; i += WINDOW) windows.push(toCheck.slice(i, i + WINDOW));
  let next = 0;
  await Promise.all(Array.from({ length: Math.max(1, Math.min(opts.concurrency, windows.length)) }, async () => {
    while (next < windows.length) {
      const ids = windows[next++]!;
      /** undefined: unreadable, already reported. */
      let blobs: (Buffer | null | undefined)[];
      try {
        blobs = await getBlobs(store, ids);
      } catch {
        // One unreadable record fails the whole window: read it blob by blob to find which.
        blobs = [];
        for (const id of ids) {
          try {
            blobs.push(await store.get(id));
          } catch (err) {
            bad.set(id, { problem: 'corrupt', detail: (err as Error).message });
            blobs.push(undefined);
          }
        }
      }
      ids.forEach((id, i) => {
        if (blobs[i] !== undefined) check(id, blobs[i]);
      });
    }
  }));

  const damagedSnapshots: VerifyReport['damagedSnapshots'] = [];
  for (const { s, d } of snapshots) {
    let badChunks = 0;
    for (const id of chunksOf.get(s.id) ?? []) if (bad.has(id)) badChunks++;
    const problem = manifestProblem.get(s.id) ?? null;
    if (badChunks || problem) damagedSnapshots.push({ id: s.id, desktopId: d.id, desktop: d.name, kind: s.kind, createdAt: s.createdAt, badChunks, manifestProblem: problem });
  }
  return {
    startedAt: new Date(t0).toISOString(),
    seconds: (Date.now() - t0) / 1000,
    samplePercent: opts.samplePercent,
    chunksReferenced: chunkKeys.size,
    chunksChecked: toCheck.length,
    bytesChecked,
    damaged: [...bad].slice(0, 1000).map(([id, b]) => ({ id, ...b })),
    damagedCount: bad.size,
    damagedSnapshots,
    snapshotsChecked: snapshots.length,
  };
}
