import { createCipheriv, randomBytes } from 'node:crypto';
import { open, rename, rm, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { z } from 'zod';
import { runQemuTool, SECRET_FD_OBJECT, SECRET_FIFO } from '../qemu/qemu-tools.js';
import { createArgs, createLayerFromTemplate, createWithQemu, type LayerShape } from './layer-template.js';
import { luksHeaderRange, UnsupportedImage } from './qcow2/qcow2-format.js';
import { appendRange, presentRanges } from './qcow2/qcow2-map.js';
import type { ReadAhead } from '../files/stamped.js';
import { DiskError } from './block-device.js';
import type { Range } from '../core/chunks/delta.js';

/**
 * The laptop's live disk: a qcow2 chain encrypted with LUKS (AES-256-XTS), run by QEMU's own
 * block layer. `base` holds the checkpoint (check-out fills it; no subclusters: see
 * layer-template.ts); `top` holds every write since the last check-in or replica, with extended L2
 * (a 4 KiB write allocates subclusters, not a whole cluster). Top's allocated extents are the dirty set.
 */
export interface ChainFiles {
  base: string;
  top: string;
}

/** The two names a top layer's file alternates between (a live replica freezes one and writes the other). */
export const TOP_FILES = ['top.qcow2', 'top-b.qcow2'] as const;
export type TopFileName = (typeof TOP_FILES)[number];

export function chainFiles(dir: string, top: TopFileName = 'top.qcow2'): ChainFiles {
  return { base: join(dir, 'base.qcow2'), top: join(dir, top) };
}

/** The other top name: where a live replica's new top goes. */
export function otherTop(top: TopFileName): TopFileName {
  return top === 'top.qcow2' ? 'top-b.qcow2' : 'top.qcow2';
}

/** Base clusters as large as a chunk (up to qcow2's 2 MiB): copy-on-read then takes whole chunks. */
export function baseClusterSize(chunkSize: number): number {
  return Math.min(Math.max(chunkSize, 64 * 1024), 2 * 1024 * 1024);
}

/** 128 KiB clusters with 32 subclusters: 4 KiB allocation units, as QEMU's docs recommend. */
export const TOP_CLUSTER_SIZE = 128 * 1024;

export interface RemoteBacking {
  socketPath: string;
  exportName: string;
}

/**
 * A chain with its LUKS passphrases (base64): `secret` opens the top, `baseSecret` the base.
 * Vaults made before one secret per layer have no `baseSecret`: `secret` opens both layers.
 */
export interface Chain {
  files: ChainFiles;
  secret: string;
  baseSecret?: string;
}

/** The passphrase of one layer of `chain`. */
export function layerSecret(chain: Chain, layer: 'base' | 'top'): string {
  return layer === 'base' ? (chain.baseSecret ?? chain.secret) : chain.secret;
}

export interface ChainSpec {
  files: ChainFiles;
  secretId: string;
  /** The base's own secret object (one secret per layer); without it the base uses `secretId` too. */
  baseSecretId?: string;
  /** The base opened read-only under a writable top (a complete base never changes while it runs). */
  baseReadOnly?: boolean;
  /** Node names are `<prefix>-top`, `<prefix>-base`, `<prefix>-remote`. */
  prefix: string;
  /** While the check-out is in flight: the checkpoint, served over NBD, backs the base. */
  remote?: RemoteBacking;
  readOnly?: boolean;
}

function fileNode(filename: string, readOnly: boolean | 'inherit') {
  // Host page cache on (QEMU's default writeback): the guest's flushes still reach the disk.
  return { driver: 'file', filename, ...(readOnly === 'inherit' ? {} : { 'read-only': readOnly }), locking: 'on' };
}

/** The -blockdev / blockdev-add description of the whole chain, top node first. */
export function chainBlockdev(spec: ChainSpec): Record<string, unknown> {
  const encrypt = { format: 'luks', 'key-secret': spec.secretId };
  const ro = spec.readOnly ?? false;
  const baseRo = ro || (spec.baseReadOnly ?? false);
  const remote = spec.remote
    ? { driver: 'nbd', 'node-name': `${spec.prefix}-remote`, server: { type: 'unix', path: spec.remote.socketPath }, export: spec.remote.exportName, 'read-only': true, 'reconnect-delay': 5 }
    : null;
  const base = {
    driver: 'qcow2',
    'node-name': `${spec.prefix}-base`,
    // The file inherits read-only from the qcow2 node: a live fold (block-commit into the base,
    // src/live/) reopens the base read-write, which an explicitly read-only file child refuses.
    file: fileNode(spec.files.base, ro ? true : 'inherit'),
    encrypt: { format: 'luks', 'key-secret': spec.baseSecretId ?? spec.secretId },
    backing: remote,
    'read-only': baseRo,
  };
  return {
    driver: 'qcow2',
    'node-name': `${spec.prefix}-top`,
    file: fileNode(spec.files.top, ro),
    encrypt,
    backing: base,
    'read-only': ro,
    discard: 'unmap',
  };
}

/** The base layer alone (check-out fills it while the top is still being made). */
export function baseBlockdev(spec: ChainSpec): Record<string, unknown> {
  return chainBlockdev(spec).backing as Record<string, unknown>;
}

/** A chain as a `json:` filename for qemu-img (no comma escaping, the same shape QEMU gets). */
export function chainFilename(spec: ChainSpec, layer: Layer = 'top'): string {
  const top = chainBlockdev(spec);
  const node = layer === 'top' ? top : layer === 'top-alone' ? { ...top, backing: null } : (top.backing as Record<string, unknown>);
  const strip = (o: Record<string, unknown>): Record<string, unknown> => {
    const { 'node-name': _n, ...rest } = o;
    if (rest.backing && typeof rest.backing === 'object') rest.backing = strip(rest.backing as Record<string, unknown>);
    return rest;
  };
  return `json:${JSON.stringify(strip(node))}`;
}

/** The shape of a layer: base clusters as large as a chunk; the top with 128 KiB clusters and extended L2. */
export function layerShape(layer: 'base' | 'top', chunkSize: number): LayerShape {
  return layer === 'base' ? { kind: 'base', clusterSize: baseClusterSize(chunkSize) } : { kind: 'top', clusterSize: TOP_CLUSTER_SIZE };
}

/**
 * Creates one empty layer, atomically (a temp file renamed into place, so a kill never leaves a
 * half-made image behind). With a template directory the layer is a re-keyed copy of a template
 * (milliseconds); without, qemu-img makes it (≈ 2 s of CPU for QEMU's PBKDF benchmark).
 */
export async function createLayer(chain: Chain, layer: 'base' | 'top', sizeBytes: number, chunkSize: number, templates?: string): Promise<void> {
  const path = chain.files[layer];
  const secret = layerSecret(chain, layer);
  const shape = layerShape(layer, chunkSize);
  if (templates) return createLayerFromTemplate(templates, shape, path, sizeBytes, secret);
  const tmp = `${path}.new`;
  await rm(tmp, { force: true });
  await createWithQemu(createArgs(tmp, sizeBytes, shape), secret);
  await rename(tmp, path);
}

/** Both layers at once. */
export async function createChain(chain: Chain, sizeBytes: number, chunkSize: number, templates?: string): Promise<void> {
  await Promise.all([createLayer(chain, 'base', sizeBytes, chunkSize, templates), createLayer(chain, 'top', sizeBytes, chunkSize, templates)]);
}

const MapEntry = z.object({ start: z.number(), length: z.number(), depth: z.number(), present: z.boolean().optional(), zero: z.boolean(), data: z.boolean() });
export type MapEntry = z.infer<typeof MapEntry>;

/** A layer as tools open it: the top with the base behind it, the top alone (no backing), or the base. */
type Layer = 'top' | 'top-alone' | 'base';

const TOOL_SECRET = 'sec0';
const TOOL_BASE_SECRET = 'sec0-base';
const TOOL_MASTER = 'master0';

/**
 * A QEMU tool's view of one layer or the whole chain, and what goes through its secret FIFO.
 * One layer: its passphrase. The chain with a secret per layer: a one-time master key, the two
 * passphrases on the command line encrypted under it (as `carryon run` hands them to QEMU).
 */
function toolArgs(chain: Chain, layer: Layer, readOnly: boolean): { args: string[]; secret: string } {
  const spec: ChainSpec = { files: chain.files, secretId: TOOL_SECRET, prefix: 'c', readOnly };
  if (layer !== 'top' || chain.baseSecret === undefined) {
    return { args: ['--object', SECRET_FD_OBJECT(TOOL_SECRET), chainFilename(spec, layer)], secret: layerSecret(chain, layer === 'base' ? 'base' : 'top') };
  }
  const master = randomBytes(32);
  const sealed = (id: string, secret: string) => {
    const iv = randomBytes(16);
    const c = createCipheriv('aes-256-cbc', master, iv);
    const data = Buffer.concat([c.update(secret, 'utf8'), c.final()]).toString('base64');
    return ['--object', `secret,id=${id},data=${data},keyid=${TOOL_MASTER},iv=${iv.toString('base64')},format=base64`];
  };
  return {
    args: ['--object', `secret,id=${TOOL_MASTER},file=${SECRET_FIFO},format=base64`, ...sealed(TOOL_SECRET, chain.secret), ...sealed(TOOL_BASE_SECRET, chain.baseSecret), chainFilename({ ...spec, baseSecretId: TOOL_BASE_SECRET }, layer)],
    secret: master.toString('base64'),
  };
}

async function runOnChain(chain: Chain, layer: Layer, readOnly: boolean, args: (target: string[]) => string[], okCodes?: number[]) {
  const t = toolArgs(chain, layer, readOnly);
  return runQemuTool('qemu-img', args(t.args), { secret: t.secret, okCodes });
}

/** `qemu-img map` of a chain (qemu-img opens it shared, so it also works while QEMU runs it). */
export async function mapChain(chain: Chain, layer: Layer = 'top'): Promise<MapEntry[]> {
  const { stdout } = await runOnChain(chain, layer, true, (t) => ['map', '-U', '--output=json', ...t]);
  const parsed = z.array(MapEntry).safeParse(JSON.parse(stdout));
  if (!parsed.success) throw new DiskError('state', `qemu-img map gave an unexpected answer: ${parsed.error.issues[0]?.message}`);
  return parsed.data;
}

/**
 * Byte ranges written since the checkpoint (allocated in the top layer, as data or as zeros),
 * merged and sorted: read from the top's own tables (qcow2-map.ts), or from `qemu-img map` of the
 * top alone for a layer that parser does not take (with the base behind it, qemu-img also walked
 * the base's allocation: on a 16 GiB desktop a JSON six times larger, and a second LUKS open).
 */
export async function topExtents(chain: Chain, ahead?: ReadAhead): Promise<Range[]> {
  try {
    return await (ahead ? ahead.get(presentRanges, chain.files.top) : presentRanges(chain.files.top));
  } catch (err) {
    if (!(err instanceof UnsupportedImage)) throw err;
  }
  const out: Range[] = [];
  for (const e of await mapChain(chain, 'top-alone')) {
    if (e.present === undefined) throw new DiskError('state', 'qemu-img map does not say which ranges the top layer holds ("present"): QEMU 6.2 or later is needed');
    if (e.present) appendRange(out, e.start, e.length);
  }
  return out;
}

/**
 * Merges the top into the base and leaves the top empty (offline; idempotent, so a killed merge is
 * simply run again). `keepTop`: the top is left as it is (`-d`), for a top that is deleted next
 * (a parked check-in): emptying it punched a hole per written cluster and cost more wall time than
 * the merge's own writes (4 GiB, 41 MiB of 64 KiB writes: ≈ 1.0–1.6 s → 0.8 s on this box).
 */
export async function mergeTop(chain: Chain, opts: { keepTop?: boolean } = {}): Promise<void> {
  const commit = (cache: string[]) => runOnChain(chain, 'top', false, (t) => ['commit', '-q', ...cache, ...(opts.keepTop ? ['-d'] : []), ...t]);
  // O_DIRECT (cache=none) halves a large merge: 4 GiB, 41 MiB of 64 KiB writes, 0.42 s → 0.23 s
  // here (through the page cache the kernel spent 0.3 s of system time on it); one changed chunk
  // took 8 ms longer, so small tops go through the page cache. qemu-img flushes at the end either
  // way: as durable. A file system without O_DIRECT refuses the open: the merge is idempotent, so
  // it simply runs again through the page cache.
  const { top } = await chainBytesOnDisk(chain.files);
  if (top < DIRECT_MERGE_BYTES) return void (await commit([]));
  await commit(['-t', 'none']).catch(() => commit([]));
}

/** Tops holding at least this much merge with O_DIRECT (mergeTop). */
const DIRECT_MERGE_BYTES = 4 * 1024 * 1024;

/** `qemu-img check` of both layers; leaked clusters (exit 3, left by a kill) are harmless and repaired. */
export async function checkChain(chain: Chain, layers: readonly ('base' | 'top')[] = ['base', 'top']): Promise<void> {
  for (const layer of layers) {
    await runOnChain(chain, layer === 'top' ? 'top-alone' : 'base', false, (t) => ['check', '-q', '-r', 'leaks', ...t], [3]);
  }
}

/** Writes the chain's current contents as a plaintext image (the user's explicit export). */
export async function convertChain(chain: Chain, out: string, format: 'raw' | 'qcow2'): Promise<void> {
  await runOnChain(chain, 'top', true, (t) => ['convert', '-U', '-O', format, ...t, out]);
}

/** Bytes the files really take on disk (what the chain costs the laptop). */
export async function chainBytesOnDisk(files: ChainFiles): Promise<{ base: number; top: number }> {
  const size = async (p: string) => stat(p).then((s) => s.blocks * 512).catch(() => 0);
  return { base: await size(files.base), top: await size(files.top) };
}


/**
 * Crypto-erase of a chain: the LUKS header (its key slots hold the only copies of the volume key)
 * is overwritten with random bytes and synced, so the data left in the files cannot be decrypted
 * with any passphrase. Without a header pointer, the first 16 MiB are overwritten instead.
 */
export async function eraseChainKeys(dir: string): Promise<void> {
  // Every layer file a disk may have: the base and both top names (a live replica's frozen layer included).
  await eraseLayerKeys([join(dir, 'base.qcow2'), ...TOP_FILES.map((t) => join(dir, t))]);
}

/** Crypto-erase of the layer files named (missing ones are skipped). */
export async function eraseLayerKeys(paths: string[]): Promise<void> {
  await Promise.all(paths.map(async (path) => {
    let range: { offset: number; length: number } | null;
    try {
      range = await luksHeaderRange(path);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return;
      throw err;
    }
    const size = (await stat(path)).size;
    const { offset, length } = range ?? { offset: 0, length: 16 * 1024 * 1024 };
    const fh = await open(path, 'r+');
    try {
      const end = Math.min(offset + length, size);
      for (let at = offset; at < end; at += 1 << 20) {
        const n = Math.min(1 << 20, end - at);
        await fh.write(randomBytes(n), 0, n, at);
      }
      await fh.sync();
    } finally {
      await fh.close();
    }
  }));
}
