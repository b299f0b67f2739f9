import { CarryonError } from '../../core/errors.js';
import { convertChain } from '../../disk/chain.js';
import { openDesktopDisks } from '../../live/disks/open.js';
import { recordEvent } from '../../live/disks/events.js';
import { layerProblem } from '../../live/disks/layer-guard.js';
import { loadDevice } from '../vault/home.js';
import type { ClientEnv } from '../session/session.js';
import { Vault } from '../vault/vault.js';
import { unlock } from '../vault/key-release.js';

/** Writes the desktop's current disk as a plaintext image (raw or qcow2) where the user asks. */
export async function exportDisk(env: ClientEnv, desktopRef: string, outPath: string, format: 'raw' | 'qcow2') {
  const device = await loadDevice(env.home);
  const vault = await Vault.open(env.home);
  const state = await vault.find(desktopRef);
  const { keys } = await unlock(vault, device, await env.password(), state);
  const opened = await openDesktopDisks(vault, state, keys);
  const disk = opened.disks[0]!;
  if (!disk.entry.complete) throw new CarryonError('wrong-state', `${state.name} is still being checked out: finish \`carryon checkout\` first`);
  // A plaintext copy leaves the vault's protection: only where the broker's policy allowed it at check-out.
  if (state.config.exportAllowed !== true) {
    await recordEvent(env.home, 'export-refused', state.desktopId, outPath);
    throw new CarryonError('export-denied', `exporting ${state.name} is not allowed by its policy (exportAllowed); ask an administrator`);
  }
  // A tampered or damaged chain would export other bytes than the desktop's.
  const problem = await layerProblem(vault, opened.state, keys);
  if (problem?.refused) throw new CarryonError(opened.state.damaged ? 'base-damaged' : 'layer-tampered', problem.message);
  await convertChain(disk.chain, outPath, format);
  await recordEvent(env.home, 'export', state.desktopId, `${format} to ${outPath}`);
  return { path: outPath, format, bytes: disk.base.diskSize };
}
