import { readFileSync } from 'node:fs';
import { rm } from 'node:fs/promises';
import { join } from 'node:path';
import { z } from 'zod';
import { checkChain, chainFiles, mergeTop, type Chain, type TopFileName } from '../disk/chain.js';
import { writeFileAtomic } from '../files/atomic.js';
import { encodeManifest, type Manifest } from '../core/chunks/manifest.js';

/**
 * Which files make a host disk's chain while a live replica moves it (live/live-chain.ts):
 * `layout.json` beside the layers, written before each step QEMU takes. `under` is the frozen
 * layer (between base and top) while a point is open; `mergingTo` the digest its fold gives the
 * base once the broker acknowledged it (its manifest is `next.manifest`). No file: `top.qcow2`.
 */
const Layout = z.object({ v: z.literal(1), top: z.enum(['top.qcow2', 'top-b.qcow2']), under: z.enum(['top.qcow2', 'top-b.qcow2']).nullable(), mergingTo: z.string().regex(/^[0-9a-f]{64}$/).nullable() });
export type Layout = z.infer<typeof Layout>;

const NONE: Layout = { v: 1, top: 'top.qcow2', under: null, mergingTo: null };

/** Read synchronously: every chain of the host is named through it (keys.ts hostChain). A damaged record is an error, never a guess. */
export function readLayout(dir: string): Layout {
  let raw: string;
  try {
    raw = readFileSync(join(dir, 'layout.json'), 'utf8');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return NONE;
    throw err;
  }
  return Layout.parse(JSON.parse(raw));
}

export const writeLayout = (dir: string, l: Layout) => writeFileAtomic(join(dir, 'layout.json'), JSON.stringify(l));

/** The frozen layer as a chain of its own over the base (tops share one secret). */
export function frozenChain(chain: Chain, dir: string, under: TopFileName): Chain {
  return { ...chain, files: { base: chain.files.base, top: join(dir, under) } };
}

/** The base's records once it holds a replica: its manifest, and complete at that digest. */
export async function recordBase(dir: string, manifest: Manifest, digest: string): Promise<void> {
  await writeFileAtomic(join(dir, 'base.manifest'), encodeManifest(manifest));
  await writeFileAtomic(join(dir, 'base.json'), JSON.stringify({ v: 1, digest, complete: true }));
}

/**
 * A host killed (or QEMU lost) mid-replica: before the chain opens again, the open point ends as
 * the laptop's does (live/disks/open.ts settleLiveLayers). Acknowledged: the frozen layer goes
 * into the base, which then holds the replica. Not: the top's writes go down into the frozen
 * layer, which is the top again. Nothing the guest wrote is lost either way.
 */
export async function settleLayout(dir: string, chain: Chain, nextManifest: () => Promise<Manifest>): Promise<void> {
  const l = readLayout(dir);
  if (!l.under) return;
  if (l.mergingTo) {
    const folding = frozenChain(chain, dir, l.under);
    await mergeTop(folding);
    await checkChain(folding, ['base']);
    await recordBase(dir, await nextManifest(), l.mergingTo);
    await writeLayout(dir, { v: 1, top: l.top, under: null, mergingTo: null });
    await rm(join(dir, l.under), { force: true });
    return;
  }
  await mergeTop({ files: { base: join(dir, l.under), top: chainFiles(dir, l.top).top }, secret: chain.secret, baseSecret: chain.secret });
  await writeLayout(dir, { v: 1, top: l.under, under: null, mergingTo: null });
  await rm(join(dir, l.top), { force: true });
}
