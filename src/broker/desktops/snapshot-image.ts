import { CarryonError } from '../../core/errors.js';
import { unwrapLineageKeys } from '../../core/keys.js';
import { decodeManifest } from '../../core/chunks/manifest.js';
import { exportImage } from '../../import/export.js';
import type { BrokerContext } from '../context.js';

/** Re-assembles a desktop's current snapshot (first disk) from the store into a raw file at `out`. */
export async function exportCurrentSnapshot(ctx: BrokerContext, desktopRef: string, out: string): Promise<{ snapshotId: string }> {
  const desk = await ctx.meta.getDesktop(desktopRef);
  if (!desk?.currentSnapshot) throw new CarryonError('not-found', `desktop ${desktopRef} has no snapshot`);
  return exportSnapshot(ctx, desktopRef, desk.currentSnapshot, out);
}

/** Re-assembles one snapshot or restore point (first disk) of a desktop into a raw file at `out`. */
export async function exportSnapshot(ctx: BrokerContext, desktopRef: string, snapshotId: string, out: string): Promise<{ snapshotId: string }> {
  const desk = await ctx.meta.getDesktop(desktopRef);
  const snap = desk ? await ctx.meta.getSnapshot(snapshotId) : null;
  if (!desk || !snap || snap.desktopId !== desk.id) throw new CarryonError('not-found', `desktop ${desktopRef} has no snapshot ${snapshotId}`);
  const raw = await ctx.store.getManifest(snap.disks[0]!.digest);
  if (!raw) throw new CarryonError('store-corrupt', `manifest of snapshot ${snap.id} is missing`);
  const keys = unwrapLineageKeys(ctx.secrets.masterKey, (await ctx.meta.getLineageKeys(desk.lineageId))!, `lineage:${desk.lineageId}`);
  await exportImage(decodeManifest(raw), { store: ctx.store, keys }, out);
  return { snapshotId: snap.id };
}
