import { randomUUID } from 'node:crypto';
import { generateLineageKeys, rotateDataKey, unwrapLineageKeys, wrapLineageKeys } from '../../core/keys.js';
import { importImage } from '../../import/import.js';
import type { DesktopConfig, DesktopRow } from '../db/metadata.js';
import type { BrokerContext } from '../context.js';
import { HttpError } from '../http.js';
import { inspectForImport } from './image-checks.js';

export interface CreateDesktop {
  name: string;
  image: string;
  pool?: string;
  config: Omit<DesktopConfig, 'disks'>;
  chunkSize?: number;
}

/** Imports an image on the broker host as a new desktop with its own lineage (keys). */
export async function createDesktopFromImage(ctx: BrokerContext, actor: string, req: CreateDesktop, onProgress?: (p: { bytesDone: number; bytesTotal: number }) => void) {
  if (await ctx.meta.getDesktop(req.name)) throw new HttpError(409, 'exists', `desktop ${req.name} exists`);
  await inspectForImport(req.image, req.chunkSize);
  const pool = req.pool ? await ctx.meta.getPool(req.pool) : null;
  if (req.pool && !pool) throw new HttpError(404, 'not-found', `no pool ${req.pool}`);
  const keys = generateLineageKeys();
  const lineageId = randomUUID();
  let result;
  try {
    result = await importImage(req.image, { store: ctx.store, keys, chunkSize: req.chunkSize, onProgress });
  } catch (err) {
    await ctx.audit({ actor, action: 'desktop-import', outcome: 'failed', detail: (err as Error).message });
    const code = (err as { code?: string }).code;
    throw new HttpError(code === 'not-found' ? 404 : 400, code ?? 'import-failed', (err as Error).message);
  }
  const disks = [{ name: 'disk0', sizeBytes: result.manifest.diskSize }];
  const id = await ctx.meta.transaction(async (tx) => {
    await tx.createLineage(wrapLineageKeys(ctx.secrets.masterKey, keys, `lineage:${lineageId}`), lineageId);
    const desktopId = await tx.createDesktop({ name: req.name, poolId: pool?.id ?? null, lineageId, config: { ...req.config, disks } });
    const snap = await tx.createSnapshot({ desktopId, parentId: null, kind: 'import', disks: [{ name: 'disk0', digest: result.digest, sizeBytes: result.manifest.diskSize, chunkSize: result.manifest.chunkSize }] });
    await tx.setDesktopSnapshot(desktopId, snap);
    return desktopId;
  });
  await ctx.audit({ actor, desktopId: id, action: 'desktop-import', outcome: 'ok', detail: `${req.image}: ${result.chunksStored} chunks stored, ${result.chunksDeduped} deduplicated, ${result.holes} holes` });
  return { id, ...summary(result) };
}

function summary(r: { bytesRead: number; chunksStored: number; chunksDeduped: number; holes: number; bytesStored: number }) {
  return { bytesRead: r.bytesRead, chunksStored: r.chunksStored, chunksDeduped: r.chunksDeduped, holes: r.holes, bytesStored: r.bytesStored };
}

/** Clone: a new desktop sharing the golden image's lineage and current manifests (no data copied). */
export async function cloneDesktop(ctx: BrokerContext, actor: string, sourceRef: string, name: string, pool?: string) {
  const src = await ctx.meta.getDesktop(sourceRef);
  if (!src || !src.currentSnapshot) throw new HttpError(404, 'not-found', `no desktop ${sourceRef} with an image`);
  if (await ctx.meta.getDesktop(name)) throw new HttpError(409, 'exists', `desktop ${name} exists`);
  const poolRow = pool ? await ctx.meta.getPool(pool) : null;
  if (pool && !poolRow) throw new HttpError(404, 'not-found', `no pool ${pool}`);
  const snap = (await ctx.meta.getSnapshot(src.currentSnapshot))!;
  const id = await ctx.meta.transaction(async (tx) => {
    const desktopId = await tx.createDesktop({ name, poolId: poolRow?.id ?? src.poolId, lineageId: src.lineageId, config: src.config });
    const s = await tx.createSnapshot({ desktopId, parentId: snap.id, kind: 'clone', disks: snap.disks });
    await tx.setDesktopSnapshot(desktopId, s);
    return desktopId;
  });
  await ctx.audit({ actor, desktopId: id, action: 'desktop-clone', outcome: 'ok', detail: `from ${src.name}` });
  return { id };
}

/**
 * A new data key generation for the desktop's lineage (every desktop cloned from the same image):
 * blobs sealed from now on use it; older blobs name their generation and stay readable.
 */
export async function rotateLineageKey(ctx: BrokerContext, actor: string, desktopId: string): Promise<{ lineageId: string; generation: number }> {
  const d = await ctx.meta.getDesktop(desktopId);
  if (!d) throw new HttpError(404, 'not-found', 'no such desktop');
  const context = `lineage:${d.lineageId}`;
  const generation = await ctx.meta.transaction(async (tx) => {
    const next = rotateDataKey(unwrapLineageKeys(ctx.secrets.masterKey, (await tx.getLineageKeys(d.lineageId))!, context));
    await tx.setLineageKeys(d.lineageId, wrapLineageKeys(ctx.secrets.masterKey, next, context));
    return next.dataKeyId!;
  });
  await ctx.audit({ actor, desktopId: d.id, action: 'lineage-rotate-key', outcome: 'ok', detail: `lineage ${d.lineageId}: data key generation ${generation}` });
  return { lineageId: d.lineageId, generation };
}

/** A desktop's lineage keys, still wrapped under the master key, and the context they were wrapped for. */
export async function lineageKeysFor(ctx: BrokerContext, desktop: DesktopRow): Promise<{ wrappedKeys: string; keyContext: string }> {
  const wrapped = await ctx.meta.getLineageKeys(desktop.lineageId);
  if (!wrapped) throw new HttpError(500, 'lineage-missing', `lineage ${desktop.lineageId} has no keys`);
  return { wrappedKeys: wrapped.toString('base64'), keyContext: `lineage:${desktop.lineageId}` };
}
