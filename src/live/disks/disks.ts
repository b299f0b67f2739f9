import { createHash } from 'node:crypto';
import { lstat, mkdir } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { z } from 'zod';
import { deriveDiskSecret } from '../../core/keys.js';
import type { DesktopKeys } from './desktop-keys.js';
import type { Manifest } from '../../core/chunks/manifest.js';
import { chainBytesOnDisk, chainFiles, createLayer, layerShape, type Chain } from '../../disk/chain.js';
import { ensureTemplate } from '../../disk/layer-template.js';
import { DEFAULT_CHUNK_SIZE } from '../../core/chunks/chunking.js';
import { existsSync } from 'node:fs';
import { CarryonError } from '../../core/errors.js';
import { writeFileAtomic } from '../../files/atomic.js';
import { recordEvent } from './events.js';
import { readJsonFile } from '../../files/json-file.js';
import type { DesktopRecords, DesktopState } from './state.js';

/** A desktop disk as the client works with it: its chain, checkpoint manifest and state entry. */
export interface DesktopDisk {
  name: string;
  chain: Chain;
  base: Manifest;
  entry: DesktopState['disks'][number];
}

export function diskDir(vault: DesktopRecords, desktopId: string, name: string): string {
  return join(vault.desktopDir(desktopId), 'disks', name);
}

/** Private directory for sockets and the running owner's files. */
export function runDir(vault: DesktopRecords, desktopId: string): string {
  return join(vault.desktopDir(desktopId), 'run');
}

/**
 * Private directory for the desktop's unix sockets. Socket paths must stay under 108 bytes, which
 * a deep home would exceed: so a short path in the temp directory, 0700 and ours (checked, so
 * nobody else can pre-create it), named by a hash of the desktop's directory.
 */
export async function socketDir(vault: DesktopRecords, desktopId: string): Promise<string> {
  const uid = process.getuid?.() ?? 0;
  const parent = join(tmpdir(), `carryon-${uid}`);
  const dir = join(parent, createHash('sha256').update(vault.desktopDir(desktopId)).digest('hex').slice(0, 16));
  for (const d of [parent, dir]) {
    await mkdir(d, { recursive: true, mode: 0o700 });
    const st = await lstat(d);
    if (!st.isDirectory() || st.uid !== uid || (st.mode & 0o077) !== 0) {
      throw new CarryonError('unsafe-socket-dir', `${d} is not a private directory of this user (mode ${(st.mode & 0o777).toString(8)}): remove it and try again`);
    }
  }
  return dir;
}

/** A disk's chain and its LUKS secrets: one per layer, or the one both layers of an older vault share. */
export function chainOf(vault: DesktopRecords, state: DesktopState, keys: DesktopKeys, name: string, layer: 'top' | 'under' = 'top'): Chain {
  const entry = state.disks.find((d) => d.name === name);
  const top = layer === 'under' ? entry?.under : entry?.top;
  if (!top) throw new Error(`disk ${name} of ${state.name} has no ${layer} layer`);
  const files = chainFiles(diskDir(vault, state.desktopId, name), top);
  const salt = Buffer.from(state.keys.salt, 'base64');
  if (state.layerSecrets === 'one-per-disk') return { files, secret: deriveDiskSecret(keys, state.desktopId, name, salt) };
  return { files, secret: deriveDiskSecret(keys, state.desktopId, name, salt, 'top'), baseSecret: deriveDiskSecret(keys, state.desktopId, name, salt, 'base') };
}

/**
 * Layer templates of this laptop (no data, no lasting secret: every copy is re-keyed).
 * CARRYON_TEMPLATE_DIR shares one directory between homes (the test suite does); it must be
 * writable by its user alone.
 */
export function templatesDir(home: string): string {
  return process.env.CARRYON_TEMPLATE_DIR || join(home, 'templates');
}

/**
 * Makes the templates of the default layer shapes, so the first check-out does not wait for
 * QEMU's PBKDF benchmark (≈ 2 s of CPU per template). Run at enrolment; missing ones are made
 * on first need anyway.
 */
export async function prepareLayerTemplates(home: string): Promise<void> {
  await Promise.all([layerShape('base', DEFAULT_CHUNK_SIZE), layerShape('top', DEFAULT_CHUNK_SIZE)].map((shape) => ensureTemplate(templatesDir(home), shape)));
}

/**
 * Makes the layers a check-out still lacks. Bases are awaited (the fill writes into them); the
 * tops are returned as one promise, so making them overlaps the download.
 */
export async function createMissingLayers(vault: DesktopRecords, state: DesktopState, keys: DesktopKeys): Promise<{ tops: Promise<void> }> {
  const missingTops: (() => Promise<void>)[] = [];
  for (const d of state.disks) {
    const dir = diskDir(vault, state.desktopId, d.name);
    await mkdir(dir, { recursive: true, mode: 0o700 });
    const chain = chainOf(vault, state, keys, d.name);
    const base = await vault.manifest(state.desktopId, d.baseDigest);
    if (!existsSync(chain.files.top)) missingTops.push(() => createLayer(chain, 'top', base.diskSize, base.chunkSize, templatesDir(vault.home)));
    if (!existsSync(chain.files.base)) {
      if (d.complete) throw new CarryonError('bad-state', `the disk files of ${state.name} are missing; roll back or cancel to start over`);
      await createLayer(chain, 'base', base.diskSize, base.chunkSize, templatesDir(vault.home));
    }
  }
  // The tops are made once the bases are (the fill needs only the bases): made beside the bases,
  // their two qemu-img runs doubled the bases' time on the transfer's path (≈ 90 → 40 ms).
  const all = Promise.all(missingTops.map((make) => make())).then(() => undefined);
  all.catch(() => undefined); // observed by the caller; never an unhandled rejection meanwhile
  return { tops: all };
}

/** What the owner of a filling chain reports for `status` (and `status` alone cannot know). */
const FillReport = z.object({
  pid: z.number().int(),
  done: z.number(),
  total: z.number(),
  updatedAt: z.string(),
  failures: z.array(z.object({ at: z.string(), message: z.string() })).default([]),
  /** Chunks this process copied from the laptop's own copies of clones, and fetched from the transfer server. */
  copiedChunks: z.number().int().nonnegative().optional(),
  fetchedChunks: z.number().int().nonnegative().optional(),
});
export type FillReport = z.infer<typeof FillReport>;

export async function writeFillReport(vault: DesktopRecords, desktopId: string, report: FillReport): Promise<void> {
  await mkdir(runDir(vault, desktopId), { recursive: true, mode: 0o700 });
  await writeFileAtomic(join(runDir(vault, desktopId), 'fill.json'), JSON.stringify(report));
}

export async function readFillReport(vault: DesktopRecords, desktopId: string): Promise<FillReport | null> {
  // For display only, and replaced once a second: damaged reads as none.
  return readJsonFile(join(runDir(vault, desktopId), 'fill.json'), FillReport, { missing: null, damaged: null });
}

const FailureList = z.array(z.object({ at: z.string(), message: z.string() }));
const failuresFile = (vault: DesktopRecords, desktopId: string) => join(vault.desktopDir(desktopId), 'failures.json');

export async function readDiskFailures(vault: DesktopRecords, desktopId: string): Promise<{ at: string; message: string }[]> {
  // For status and the heartbeat; each failure also went to the offline events when it happened: damaged reads as none.
  return readJsonFile(failuresFile(vault, desktopId), FailureList, { missing: [], damaged: [] });
}

/** Failures a reader saw (a chunk that failed authentication, a link that gave up), kept for status and the audit. */
export async function recordDiskFailure(vault: DesktopRecords, desktopId: string, message: string): Promise<void> {
  const list = await readDiskFailures(vault, desktopId);
  list.push({ at: new Date().toISOString(), message });
  await recordEvent(vault.home, 'disk-read-failure', desktopId, message);
  await writeFileAtomic(failuresFile(vault, desktopId), JSON.stringify(list.slice(-50))).catch(() => undefined);
}

/** Bytes the top layers take (the change since the checkpoint, as stored) — needs no keys. */
export async function topBytes(vault: DesktopRecords, state: DesktopState): Promise<number> {
  let sum = 0;
  for (const d of state.disks) sum += (await chainBytesOnDisk(chainFiles(diskDir(vault, state.desktopId, d.name), d.top))).top;
  return sum;
}
