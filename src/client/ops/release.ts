import { z } from 'zod';
import { CarryonError } from '../../core/errors.js';
import { CheckoutView } from '../../net/broker-client.js';
import { diskDir } from '../../live/disks/disks.js';
import { openDesktopDisks } from '../../live/disks/open.js';
import { readFilled } from '../../live/fill/fill-direct.js';
import { claimOwner } from '../../live/fill/holder.js';
import type { DeviceIdentity } from '../vault/home.js';
import { eraseParked, findParked, keepsLocalCopy, parkBases } from '../vault/parked.js';
import { onlineSession, type ClientEnv } from '../session/session.js';
import { fetchUnlockShare } from '../vault/online-unlock.js';
import { Vault, type DesktopState } from '../vault/vault.js';

/** Rollback (discard offline changes) or cancel (stop a check-out in flight): both unlock. */
export async function release(env: ClientEnv, desktopRef: string, how: 'rollback' | 'cancel') {
  const vault = await Vault.open(env.home);
  // The login's answer brings the check-out's unlock share where parking will want it (what `find` refuses, it refuses below, as before).
  const hint = await vault.find(desktopRef).catch(() => null);
  const { broker, device } = await onlineSession(env, undefined, hint && keepsLocalCopy(hint) && hint.keys.online ? hint.checkoutId : undefined);
  try {
    const state = await vault.find(desktopRef);
    const owner = await claimOwner(vault, state.desktopId, how === 'cancel' ? 'serve' : 'checkin', env.log);
    let parked = false;
    try {
      // Asked while the check-out is still open: parking then opens the vault without the KDF (online-unlock.ts).
      const share = keepsLocalCopy(state) ? await fetchUnlockShare(broker, state, env.log).catch(() => null) : null;
      await broker.call('POST', `/v1/checkouts/${state.checkoutId}/${how}`, {}, z.object({ checkout: CheckoutView }));
      // The base still equals the checkpoint (rollback), or holds what arrived (cancel): kept as a parked copy where policy allows.
      parked = await parkReleased(env, device, vault, state, how, share).catch((err: unknown) => {
        env.log(`no parked copy kept of ${state.name}: ${(err as Error).message}`);
        return false;
      });
    } finally {
      await owner();
    }
    await vault.wipe(state.desktopId);
    const kept = parked ? '; a parked copy stays on this laptop for the next check-out' : '';
    env.log(how === 'rollback' ? `rolled back ${state.name}: offline changes discarded, desktop unlocked${kept}` : `cancelled the check-out of ${state.name}${parked ? `: what had arrived is kept as a parked copy for the next check-out` : ''}`);
    return { desktopId: state.desktopId, state: how === 'rollback' ? 'rolled_back' : 'cancelled', parked };
  } finally {
    await broker.close();
  }
}

/** Parks the bases of a released desktop: complete ones whole, a cancelled check-out's with the chunks it made durable. */
async function parkReleased(env: ClientEnv, device: DeviceIdentity, vault: Vault, found: DesktopState, how: 'rollback' | 'cancel', unlockShare: string | null): Promise<boolean> {
  if (!keepsLocalCopy(found)) return false;
  const password = await env.password();
  const opened = await vault.openKeys(device, password, found, { unlockShare });
  // A replica's merge a kill interrupted is finished first: the base then holds the replica.
  const { state, keys } = opened.state.disks.some((d) => d.mergingTo) ? { state: (await openDesktopDisks(vault, opened.state, opened.keys)).state, keys: opened.keys } : opened;
  const disks = [];
  for (const d of state.disks) {
    const known = d.complete ? null : [...(await readFilled(diskDir(vault, state.desktopId, d.name)))];
    if (known && known.length === 0) continue;
    disks.push({ name: d.name, digest: d.baseDigest, known });
  }
  if (disks.length === 0) return false;
  return parkBases({ vault, device, password, state, keys, how, disks, log: env.log, wrapKey: opened.wrapKey, unlockShare });
}

/** Removes a desktop's local copy (or its parked copy) after the user said so explicitly. */
export async function discardLocal(env: ClientEnv, desktopRef: string) {
  const vault = await Vault.open(env.home);
  let state: DesktopState;
  try {
    state = await vault.find(desktopRef);
  } catch (err) {
    const parked = err instanceof CarryonError && err.code === 'parked' ? await findParked(env.home, desktopRef) : null;
    if (!parked) throw err;
    await eraseParked(env.home, parked.desktopId);
    env.log(`removed the parked copy of ${parked.name}`);
    return { desktopId: parked.desktopId, state: 'discarded' };
  }
  const owner = await claimOwner(vault, state.desktopId, 'checkin', env.log);
  await owner();
  // The user asked for all of it to go: a parked copy this check-out made (a kill mid-check-in) goes too.
  await eraseParked(env.home, state.desktopId);
  await vault.wipe(state.desktopId);
  env.log(`removed the local copy of ${state.name}`);
  return { desktopId: state.desktopId, state: 'discarded' };
}
