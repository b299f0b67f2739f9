import { existsSync } from 'node:fs';
import { mkdir, readFile, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { z } from 'zod';
import { chunkLength } from '../core/chunks/chunking.js';
import { CarryonError } from '../core/errors.js';
import type { LineageKeys } from '../core/keys.js';
import { decodeManifest, encodeManifest, manifestDigest, type Manifest } from '../core/chunks/manifest.js';
import { createLayer, layerSecret, topExtents, type Chain } from '../disk/chain.js';
import { Qcow2BaseWriter } from '../disk/qcow2/qcow2-base-writer.js';
import { UnsupportedImage } from '../disk/qcow2/qcow2-format.js';
import { fillDirect, readFilled } from '../live/fill/fill-direct.js';
import { readJsonFile } from '../files/json-file.js';
import { writeFileAtomic } from '../files/atomic.js';
import type { TransferSession } from '../transfer-client/client.js';

/**
 * A host's copy of a desktop disk: the same encrypted qcow2 chain a laptop keeps (a base filled
 * from the snapshot's chunks, a top the guest writes into), kept between runs. `base.json` says
 * which manifest the base holds and whether it is complete; `filled.json` (fill-direct.ts) which
 * chunks of it are durable while it is not.
 */
const BaseState = z.object({ v: z.literal(1), digest: z.string().regex(/^[0-9a-f]{64}$/), complete: z.boolean() });
type BaseState = z.infer<typeof BaseState>;

export interface HostDisk {
  name: string;
  dir: string;
  chain: Chain;
  manifest: Manifest;
  digest: string;
}

const readBaseState = (dir: string) => readJsonFile(join(dir, 'base.json'), BaseState, { missing: null, damaged: null });
const writeBaseState = (dir: string, s: BaseState) => writeFileAtomic(join(dir, 'base.json'), JSON.stringify(s));

/** Whether the host keeps a complete base of this disk (the broker prefers such a host). */
export async function hasCompleteBase(dir: string): Promise<boolean> {
  return (await readBaseState(dir))?.complete === true;
}

/**
 * Makes the base ready to fill with `disk.manifest`, keeping what it already holds: a chunk index
 * whose ID is the same in the manifest the base held and the new one stays (only chunks the host
 * lacks travel); an index that became a hole is written with zeros. A top layer written on an
 * older snapshot is never thrown away here: the start is refused.
 * Returns whether the base still needs chunks.
 */
export async function readyBase(disk: HostDisk, templates: string): Promise<boolean> {
  await mkdir(disk.dir, { recursive: true, mode: 0o700 });
  const held = await readBaseState(disk.dir);
  if (held?.digest === disk.digest && existsSync(disk.chain.files.base)) return !held.complete;
  const old = held && existsSync(disk.chain.files.base) ? await readFile(join(disk.dir, 'base.manifest')).then(decodeManifest).catch(() => null) : null;
  if (existsSync(disk.chain.files.top)) {
    if (old && (await topExtents(disk.chain)).length > 0) {
      throw new CarryonError('host-chain-diverged', `disk ${disk.name} holds what the guest wrote on an older snapshot (${held!.digest.slice(0, 12)}…): it is not replaced; an administrator releases it first`);
    }
    await rm(disk.chain.files.top, { force: true });
  }
  const reusable = old && held && manifestDigest(old) === held.digest && old.diskSize === disk.manifest.diskSize && old.chunkSize === disk.manifest.chunkSize;
  if (!reusable) {
    await rm(join(disk.dir, 'filled.json'), { force: true });
    await createLayer(disk.chain, 'base', disk.manifest.diskSize, disk.manifest.chunkSize, templates);
  } else {
    await carryOver(disk, old, held.complete ? null : await readFilled(disk.dir));
  }
  await writeFileAtomic(join(disk.dir, 'base.manifest'), encodeManifest(disk.manifest));
  await writeBaseState(disk.dir, { v: 1, digest: disk.digest, complete: false });
  return true;
}

/** Re-targets a base from `old` to the disk's manifest: zeros where a chunk became a hole, the unchanged chunks marked present. */
async function carryOver(disk: HostDisk, old: Manifest, filled: Set<number> | null): Promise<void> {
  const next = disk.manifest;
  const writer = await Qcow2BaseWriter.open(disk.chain.files.base, layerSecret(disk.chain, 'base'), next.chunkSize);
  try {
    // Any index the old base may hold data at (a write lands before it is marked) and that is a hole now.
    for (let i = 0; i < next.chunks.length; i++) {
      if (next.chunks[i] === null && old.chunks[i] !== null) await writer.write(i, Buffer.alloc(chunkLength(i, next.diskSize, next.chunkSize)));
    }
    await writer.persist();
  } finally {
    await writer.close();
  }
  const keep = next.chunks.flatMap((id, i) => (id !== null && id === old.chunks[i] && (filled === null || filled.has(i)) ? [i] : []));
  await writeFileAtomic(join(disk.dir, 'filled.json'), JSON.stringify({ v: 1, chunks: keep }));
}

/** Pulls the chunks the bases lack over the job's ticket (the laptop's check-out path, fill-direct.ts); returns what moved. */
export async function fillBases(disks: HostDisk[], session: TransferSession, keys: LineageKeys): Promise<{ bytesMoved: number; chunksMoved: number }> {
  const sinks: Qcow2BaseWriter[] = [];
  try {
    for (const d of disks) sinks.push(await Qcow2BaseWriter.open(d.chain.files.base, layerSecret(d.chain, 'base'), d.manifest.chunkSize));
  } catch (err) {
    await Promise.all(sinks.map((s) => s.close()));
    // The laptop falls back to QEMU's writer here; a host does not yet (chunks above 2 MiB).
    if (err instanceof UnsupportedImage) throw new CarryonError('unsupported', `the host cannot fill this base: ${err.message}`);
    throw err;
  }
  try {
    const moved = await fillDirect({ disks: disks.map((d, i) => ({ disk: { base: d.manifest }, dir: d.dir, sink: sinks[i]! })), session, keys });
    for (const d of disks) await writeBaseState(d.dir, { v: 1, digest: d.digest, complete: true });
    return moved;
  } finally {
    await Promise.all(sinks.map((s) => s.close()));
  }
}

/** A top layer for each disk that has none (the guest's writes since the snapshot go there). */
export async function readyTops(disks: HostDisk[], templates: string): Promise<void> {
  for (const d of disks) if (!existsSync(d.chain.files.top)) await createLayer(d.chain, 'top', d.manifest.diskSize, d.manifest.chunkSize, templates);
}

/** Whether any disk of the desktop has a top layer (what the guest wrote is kept there). */
export function hasTop(disks: { chain: Chain }[]): boolean {
  return disks.some((d) => existsSync(d.chain.files.top));
}

/** Forgets what the guest wrote (an administrator released the desktop): the tops go, the bases stay for next time. */
export async function discardTops(disks: { chain: Chain }[]): Promise<void> {
  for (const d of disks) await rm(d.chain.files.top, { force: true });
}
