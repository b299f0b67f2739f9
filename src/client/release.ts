import { z } from 'zod';
import { CheckoutView } from './broker-client.js';
import { claimOwner } from './holder.js';
import { onlineSession, type ClientEnv } from './session.js';
import { Vault } from './vault.js';

/** Rollback (discard offline changes) or cancel (stop a check-out in flight): both unlock. */
export async function release(env: ClientEnv, desktopRef: string, how: 'rollback' | 'cancel') {
  const { broker } = await onlineSession(env);
  const vault = await Vault.open(env.home);
  try {
    const state = await vault.find(desktopRef);
    const owner = await claimOwner(vault, state.desktopId, how === 'cancel' ? 'serve' : 'checkin', env.log);
    try {
      await broker.call('POST', `/v1/checkouts/${state.checkoutId}/${how}`, {}, z.object({ checkout: CheckoutView }));
    } finally {
      await owner();
    }
    await vault.wipe(state.desktopId);
    env.log(how === 'rollback' ? `rolled back ${state.name}: offline changes discarded, desktop unlocked` : `cancelled the check-out of ${state.name}`);
    return { desktopId: state.desktopId, state: how === 'rollback' ? 'rolled_back' : 'cancelled' };
  } finally {
    await broker.close();
  }
}

/** Removes a desktop's local copy after the user said so explicitly (e.g. the broker no longer holds its check-out). */
export async function discardLocal(env: ClientEnv, desktopRef: string) {
  const vault = await Vault.open(env.home);
  const state = await vault.find(desktopRef);
  const owner = await claimOwner(vault, state.desktopId, 'checkin', env.log);
  await owner();
  await vault.wipe(state.desktopId);
  env.log(`removed the local copy of ${state.name}`);
  return { desktopId: state.desktopId, state: 'discarded' };
}
