import { CarryonError } from '../../core/errors.js';
import { topExtents } from '../../disk/chain.js';
import { chainOf, readDiskFailures, topBytes } from '../../live/disks/disks.js';
import { loadDevice } from '../vault/home.js';
import { layerProblem } from '../../live/disks/layer-guard.js';
import { readCheckoutFailure } from './checkout-failure.js';
import { fillCounts, percentLocal } from '../../live/fill/local-progress.js';
import type { ClientEnv } from '../session/session.js';
import { Vault } from '../vault/vault.js';
import { unlock } from '../vault/key-release.js';
import { unfinishedCheckin } from '../vault/parked.js';
import { readOwner } from '../../live/fill/holder.js';

/**
 * Offline-capable, and never fails for a desktop that cannot open: a locked desktop or an
 * expired lease is shown with what to do, not raised.
 */
export async function status(env: ClientEnv, desktopRef?: string) {
  const device = await loadDevice(env.home);
  const vault = await Vault.open(env.home);
  const states = desktopRef ? [await vault.find(desktopRef)] : await vault.list();
  const password = states.length > 0 ? await env.password() : '';
  const out = [];
  for (const s of states) {
    let leaseDeadline: string | null = null;
    let problem: string | null = null;
    let dirtyBytes: number | null = null;
    let opened = false;
    let refused: string | null = null;
    // A check-in cut off here: what is left, and the command that does it (a live check-in is simply under way).
    const checkingIn = await readOwner(vault, s.desktopId).then((o) => o?.kind === 'checkin');
    const unfinished = checkingIn ? null : unfinishedCheckin(s);
    // Committed: the broker no longer holds it checked out here, and its chain is mid-merge (not a tampered one): not opened.
    if (!s.parking) {
      try {
        // The very gate `serve` and `run` pass (Vault.unlock): what it refuses, they refuse.
        const { lease, keys } = await unlock(vault, device, password, s);
        opened = true;
        leaseDeadline = lease.deadline;
        // A tampered or damaged chain is reported, never mapped.
        problem = (await layerProblem(vault, s, keys))?.message ?? null;
        if (problem === null) {
          // Exact change since the checkpoint: the top layer's allocated bytes (read shared, so a running VM is fine).
          dirtyBytes = 0;
          // During a live replica the frozen layer holds what is being sent: still waiting to go until acknowledged.
          for (const d of s.disks) {
            const ranges = [];
            for (const layer of d.under && !d.mergingTo ? (['top', 'under'] as const) : (['top'] as const)) ranges.push(...(await topExtents(chainOf(vault, s, keys, d.name, layer))));
            dirtyBytes += coveredBytes(ranges);
          }
        }
      } catch (err) {
        if (!(err instanceof CarryonError)) throw err;
        if (!opened) refused = err.code;
        problem = err.code === 'desktop-locked' ? `locked: connect to the broker (\`carryon login\`, then \`carryon agent --once\`); ${err.message}` : err.code === 'lease-expired' ? `offline lease expired: connect and run \`carryon login\` to renew it (${err.message})` : err.message;
        if (err.code === 'vault-locked' || err.code === 'kdf-refused' || err.code === 'tpm' || err.code === 'home-damaged') throw err;
      }
    }
    const complete = s.disks.every((d) => d.complete);
    const failures = await readDiskFailures(vault, s.desktopId);
    // A check-out that stopped for good (a damaged snapshot) is not "transferring": say so, and why.
    const failed = await readCheckoutFailure(vault, s.desktopId);
    if (failed) problem = failed.message;
    if (unfinished) problem = problem && !s.parking ? `${unfinished}; ${problem}` : unfinished;
    const state = failed ? `failed: ${failed.reason}` : s.parking ? 'checked_in' : (await vault.isLocked(await vault.find(s.desktopId))) ? 'locked' : s.state;
    out.push({
      desktop: s.name, desktopId: s.desktopId, state, leaseDeadline,
      leaseHoursLeft: leaseDeadline ? Math.max(0, (Date.parse(leaseDeadline) - Date.now()) / 3_600_000) : 0,
      /** Exact bytes changed since the checkpoint; null where the desktop would not open (locked, lease, clock): without its keys only the top layer's stored size is known. */
      dirtyBytes,
      /** The top layers' size on disk (metadata included): an upper bound that needs no keys. */
      storedChangeBytes: await topBytes(vault, s),
      percentLocal: await percentLocal(vault, s),
      /** While a check-out fills the desktop: chunks its process copied from this laptop's copies of clones, and fetched (null otherwise). */
      ...(await fillCounts(vault, s).then((c) => ({ chunksCopiedLocally: c?.copiedChunks ?? null, chunksFetched: c?.fetchedChunks ?? null }))),
      lastReplicationAt: s.lastReplicationAt,
      /** quiesced (the guest's agent froze its file systems), crash-consistent (taken live without), or stopped. */
      lastReplicaKind: s.lastReplicaKind,
      /** Whole on this laptop and `serve`/`run` would open it now: a locked desktop or a lapsed lease is not usable offline. */
      safeOffline: complete && s.state === 'checked_out' && refused === null && problem === null, problem,
      /** The code of the refusal when `serve`/`run` would not open it offline now (locked, lease, clock); null when they would. */
      refused,
      readFailures: failures.length, lastReadFailure: failures[failures.length - 1]?.message ?? null,
      advisory: device.info.secretStorage === 'tpm' ? null : NO_TPM_ADVISORY,
    });
  }
  return out;
}

/** What `status` says on a laptop without a TPM (docs/security.md has the whole picture). */
export const NO_TPM_ADVISORY = 'no TPM: the device secret and agent key are files, and the clock and lock records can be rolled back by restoring older copies; offline policy is advisory against someone with root on this laptop';

/** Bytes covered by `ranges` (which may overlap). */
function coveredBytes(ranges: { offset: number; length: number }[]): number {
  let total = 0;
  let end = 0;
  for (const r of [...ranges].sort((a, b) => a.offset - b.offset)) {
    const from = Math.max(r.offset, end);
    if (r.offset + r.length > from) total += r.offset + r.length - from;
    end = Math.max(end, r.offset + r.length);
  }
  return total;
}
