import { hkdfSync } from 'node:crypto';
import { z } from 'zod';
import { CarryonError, EnvelopeError } from '../../core/errors.js';
import { openDesktopKeys, sealDesktopKeys, type DesktopKeys } from '../../live/disks/desktop-keys.js';
import { BrokerError, type BrokerClient } from '../../net/broker-client.js';
import type { DeviceIdentity } from './home.js';
import type { DesktopState } from '../../live/disks/state.js';
import { traced } from '../../files/trace.js';

/**
 * The vault's online wrap (docs/security.md, "Online unlock"): besides the wrap the password
 * opens (scrypt(device secret ‖ password), ≈ 0.6–0.9 s and 128 MiB every time), a check-out
 * keeps the same keys under HKDF(device secret, the check-out's unlock share). The broker hands
 * the share to the check-out's holder on this device right after checking the password, while
 * the check-out is open and the device not revoked: an online command (check-in, replicate, a
 * check-out resumed) opens the vault in a millisecond, and needs the laptop, the password (the
 * broker checks it, with its rate limits) and the broker's consent — as much as the password's
 * wrap needs, and one thing more. Offline, only the password's wrap opens it.
 */

const Share = z.string().refine((s) => Buffer.from(s, 'base64').length === 32 && /^[A-Za-z0-9+/]{43}=$/.test(s), 'an unlock share is 32 bytes in base64');

function onlineKey(deviceSecret: Buffer, share: string, desktopId: string, checkoutId: string, use: 'wrap' | 'parked' = 'wrap'): Buffer {
  if (!Share.safeParse(share).success) throw new CarryonError('bad-response', 'the broker\'s unlock share is malformed');
  const label = use === 'wrap' ? 'carryon-online-wrap:v1' : 'carryon-online-parked:v1';
  return Buffer.from(hkdfSync('sha256', deviceSecret, Buffer.from(share, 'base64'), `${label}:${desktopId}:${checkoutId}`, 32));
}

/**
 * The key of a parked copy's online wrap: this device's secret and the share of the check-out it
 * was parked from, which the broker gives again only with a new check-out of that desktop by the
 * same user on this device (broker/online-unlock.ts `parkedUnlockShare`).
 */
export async function parkedOnlineKey(device: DeviceIdentity, password: string, share: string, desktopId: string, checkoutId: string): Promise<Buffer> {
  return onlineKey(await device.secret(password), share, desktopId, checkoutId, 'parked');
}

/** The keys sealed under the check-out's share (base64), for the state's `keys.online`. */
export async function sealOnlineWrap(device: DeviceIdentity, password: string, share: string, keys: DesktopKeys, desktopId: string, checkoutId: string): Promise<string> {
  return sealDesktopKeys(onlineKey(await device.secret(password), share, desktopId, checkoutId), keys, desktopId).toString('base64');
}

/** Opens the online wrap; null when the share does not open it (the caller uses the password's wrap). */
export async function openOnlineWrap(device: DeviceIdentity, password: string, share: string, wrapped: string, desktopId: string, checkoutId: string): Promise<DesktopKeys | null> {
  try {
    return openDesktopKeys(onlineKey(await device.secret(password), share, desktopId, checkoutId), Buffer.from(wrapped, 'base64'), desktopId);
  } catch (err) {
    if (err instanceof EnvelopeError || err instanceof SyntaxError || (err instanceof CarryonError && err.code === 'bad-response')) return null;
    throw err;
  }
}

/**
 * The check-out's share from the broker for a state that has an online wrap (the session must come
 * from a password check on this device just now), or null where there is none to open or it is not
 * given (an older broker, a policy's refusal): the password's wrap then opens the vault, as before.
 */
export async function fetchUnlockShare(broker: BrokerClient, state: Pick<DesktopState, 'checkoutId' | 'keys'>, log: (line: string) => void): Promise<string | null> {
  if (!state.keys.online) return null;
  // Brought by the login's answer (onlineSession's `unlock`): no round trip. Checked as an answer would be.
  const brought = broker.takeUnlockShare(state.checkoutId);
  if (brought !== null && Share.safeParse(brought).success) return brought;
  return traced('unlock-share', async () => {
    try {
      const { share } = await broker.call('POST', `/v1/checkouts/${state.checkoutId}/unlock`, {}, z.object({ share: Share }), {}, { repeatable: true });
      return share;
    } catch (err) {
      if (!(err instanceof BrokerError)) throw err;
      if (err.status !== 404) log(`the broker did not give the online unlock (${err.message}): opening the vault with the password (a second or so)`);
      return null;
    }
  });
}
