import { ACTIVE_STATES } from '../db/metadata.js';
import type { BrokerContext } from '../context.js';

/**
 * A wipe the device acknowledged as done: the laptop's copy, and with it every change made since
 * the checkpoint (the last check-out, check-in or replica), is gone. The check-out ends `wiped`
 * and the desktop is free again at that checkpoint, so nobody waits for a check-in that can never
 * come. Returns the line the command's result and the audit carry, or null when the device held
 * no check-out of that desktop (already ended, or someone else's).
 */
export async function endWipedCheckout(ctx: BrokerContext, deviceId: string, desktopId: string, commandId: string): Promise<string | null> {
  const c = await ctx.meta.activeCheckout(desktopId);
  if (!c || c.deviceId !== deviceId) return null;
  if (!await ctx.meta.transitionCheckout(c.id, ACTIVE_STATES, 'wiped', { pendingDisks: null })) return null;
  await ctx.scheduler.finishForCheckout(c.id, 'cancelled');
  const desktop = await ctx.meta.getDesktop(desktopId);
  const what = `check-out ${c.id} of ${desktop?.name ?? desktopId} by ${c.user} ended by the wipe: the laptop's copy is erased and its changes since snapshot ${c.checkpointSnapshot} are lost; the desktop is available again`;
  await ctx.audit({ actor: `device:${deviceId}`, desktopId, action: 'wipe-unlock', outcome: 'ok', detail: `${what} (command ${commandId})` });
  return what;
}
