import { rm } from 'node:fs/promises';
import { join } from 'node:path';
import { checkChain, mergeTop } from '../../disk/chain.js';
import type { DesktopKeys } from './desktop-keys.js';
import { chainOf, diskDir, type DesktopDisk } from './disks.js';
import { recordLayers } from './layer-guard.js';
import { traced } from '../../files/trace.js';
import type { DesktopRecords, DesktopState } from './state.js';

/**
 * Opens a desktop's disks, first finishing any merge a kill interrupted: the top is merged into
 * the base again (idempotent) and the base takes the digest it was merging to.
 */
export async function openDesktopDisks(vault: DesktopRecords, state: DesktopState, keys: DesktopKeys): Promise<{ state: DesktopState; disks: DesktopDisk[] }> {
  let current = await settleLiveLayers(vault, state, keys);
  for (const d of current.disks) {
    if (!d.mergingTo) continue;
    // A parked check-in's top is erased with the vault next: it is not emptied (a rerun merges it again, the same bytes).
    await traced('merge-commit', () => mergeTop(chainOf(vault, current, keys, d.name), { keepTop: current.parking !== null }));
    testHooks.afterMerge?.();
    current = { ...current, disks: current.disks.map((x) => (x.name === d.name ? { ...x, baseDigest: d.mergingTo!, mergingTo: null } : x)) };
    // The merged base holds the restore point whose chunk IDs this laptop computed: it is the new reference.
    current = await traced('merge-record', () => recordLayers(vault, current, keys, { verifiedBases: true, topsGone: current.parking !== null }));
  }
  const disks: DesktopDisk[] = [];
  for (const entry of current.disks) {
    disks.push({ name: entry.name, chain: chainOf(vault, current, keys, entry.name), base: await vault.manifest(current.desktopId, entry.baseDigest), entry });
  }
  return { state: current, disks };
}

/**
 * A live replica cut off (its process, QEMU or the power) leaves a frozen layer under the top
 * (src/live/): folded into the base if the broker acknowledged the replica (`mergingTo`), else
 * the top is folded back into it. Both are `qemu-img commit`s, idempotent: a kill here is simply
 * run again. The chain is then base + top, as everything else expects.
 */
export async function settleLiveLayers(vault: DesktopRecords, state: DesktopState, keys: DesktopKeys): Promise<DesktopState> {
  let current = state;
  for (const d of state.disks) {
    if (!d.under) continue;
    const dir = diskDir(vault, state.desktopId, d.name);
    let gone: string;
    if (d.mergingTo) {
      const folding = chainOf(vault, current, keys, d.name, 'under');
      await mergeTop(folding);
      // A fold cut off mid-job leaves clusters the base allocated and never referenced: freed
      // now, before the base's shape is recorded (a later check would change it under its record).
      await checkChain(folding, ['base']);
      gone = d.under;
      current = { ...current, disks: current.disks.map((x) => (x.name === d.name ? { ...x, baseDigest: d.mergingTo!, mergingTo: null, under: null } : x)) };
      current = await recordLayers(vault, current, keys, { verifiedBases: true });
    } else {
      // Both layers are tops (one secret): the top's writes go down into the frozen layer, which becomes the top.
      const top = chainOf(vault, current, keys, d.name);
      await mergeTop({ files: { base: join(dir, d.under), top: top.files.top }, secret: top.secret, baseSecret: top.secret });
      gone = d.top;
      current = { ...current, disks: current.disks.map((x) => (x.name === d.name ? { ...x, top: d.under!, under: null } : x)) };
      await vault.save(current, keys);
    }
    await rm(join(dir, gone), { force: true });
  }
  return current;
}

/** Test-only kill point (CARRYON_TEST_SIGKILL_PARKED=merged, under NODE_ENV=test): after a merge, before the state says so. */
export const testHooks: { afterMerge?: () => void } = {};
if (process.env.NODE_ENV === 'test' && process.env.CARRYON_TEST_SIGKILL_PARKED === 'merged') testHooks.afterMerge = () => process.kill(process.pid, 'SIGKILL');
