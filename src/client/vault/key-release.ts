import { rm } from 'node:fs/promises';
import { join } from 'node:path';
import { z } from 'zod';
import { CarryonError } from '../../core/errors.js';
import { LeaseError, SignedLease, verifyLease, type LeasePayload } from '../../core/tokens/lease.js';
import type { DesktopKeys } from '../../live/disks/desktop-keys.js';
import { LEASE, LOCK, mintToken, readClock, readLockRecord, tokenMatches, writeClock } from './guards.js';
import { readJsonFile } from '../../files/json-file.js';
import { readTpmClock } from './tpm.js';
import { agentClockFloor, resetAgentClock } from './agent-clock.js';
import type { DeviceIdentity } from './home.js';
import { laptopClock } from './laptop-clock.js';
import type { DesktopState, Vault } from './vault.js';

/**
 * Trusted time for one desktop: never earlier than the MACed clock record, which only moves
 * forward, nor than the device clock record the agent keeps without the password (agent-clock.ts).
 * With a TPM, the record also holds the TPM's clock, which root cannot turn back, so even an older
 * copy of the record yields the right lower bound. A missing or altered record, or a TPM clock
 * that went backwards (the TPM was cleared), refuses; so does a device record that was altered,
 * or removed after this desktop had taken one.
 */
export async function trustedNow(vault: Vault, state: DesktopState, keys: DesktopKeys): Promise<Date> {
  const dir = vault.desktopDir(state.desktopId);
  const rec = await readClock(dir, keys, state.desktopId, state.name);
  const tpm = await readTpmClock();
  let floor = Date.parse(rec.lastSeen);
  if (rec.tpm && tpm) {
    if (tpm.clock < rec.tpm.clock) throw new CarryonError('clock-untrusted', `the TPM clock went backwards (the TPM was cleared?): connect to the broker and run \`carryon login\` to re-establish trusted time`);
    floor += tpm.clock - rec.tpm.clock;
  }
  // Only ever raises the bound, so with a TPM it adds to the TPM clock's guarantee, never replaces it.
  const agent = await agentClockFloor(vault.home, keys.deviceKey, leaseDevice(state), rec.agentAt !== null, state.name);
  if (agent !== null) floor = Math.max(floor, agent);
  const t = Math.max(laptopClock.now(), floor);
  const seen = Math.max(agent ?? 0, Date.parse(rec.agentAt ?? '') || 0);
  const agentAt = seen > 0 ? new Date(seen).toISOString() : null;
  // Only a lower bound: not moving it (a full disk) can never extend a lease, so a write failure must not block the user.
  if (t - Date.parse(rec.lastSeen) >= 60_000 || (tpm && !rec.tpm) || agentAt !== rec.agentAt) {
    await writeClock(dir, keys, state.desktopId, { lastSeen: new Date(t).toISOString(), tpm, agentAt }).catch((err: NodeJS.ErrnoException) => {
      if (err.code !== 'ENOSPC') throw err;
    });
  }
  return new Date(t);
}

/**
 * Sets the clock records from a fresh broker statement (check-out, online login): broker time is
 * the truth, for this desktop's record and the device's (which every vault then requires).
 */
export async function resetClock(vault: Vault, state: DesktopState, keys: DesktopKeys, issuedAt: string, device: DeviceIdentity): Promise<void> {
  const t = await resetAgentClock(vault.home, device.privateKey, leaseDevice(state), issuedAt);
  await writeClock(vault.desktopDir(state.desktopId), keys, state.desktopId, { lastSeen: new Date(t).toISOString(), tpm: await readTpmClock(), agentAt: new Date(t).toISOString() });
}

/**
 * The newest lease that verifies against the broker key pinned in the vault: the check-out's
 * (MACed) or a renewal in lease.json. A lease.json that does not verify refuses outright.
 */
export async function currentLease(vault: Vault, state: DesktopState, keys: DesktopKeys, deviceId: string): Promise<SignedLease> {
  // Missing, or not even JSON: the check-out's lease stands (as it would if the file were deleted).
  // Anything else must verify below.
  const renewed = await readJsonFile(join(vault.desktopDir(state.desktopId), LEASE), z.unknown(), { missing: null, damaged: null });
  if (renewed === null) return state.lease;
  const epoch = new Date(0);
  let payload: LeasePayload;
  try {
    payload = verifyLease(renewed, keys.brokerKey, { now: epoch, deviceId, desktopId: state.desktopId });
  } catch (err) {
    if (err instanceof LeaseError) throw new LeaseError(err.reason, `the renewed lease of ${state.name} is refused: ${err.message}`);
    throw err;
  }
  const original = verifyLease(state.lease, keys.brokerKey, { now: epoch, deviceId, desktopId: state.desktopId });
  return Date.parse(payload.issuedAt) > Date.parse(original.issuedAt) ? SignedLease.parse(renewed) : state.lease;
}

/**
 * A desktop whose unlock token is gone opens again only for a reason the vault can check: the
 * agent's signed record says the administrator unlocked it, or that lease expiry locked it and
 * a lease issued since then verifies. Then a new token is made (which needs the vault key).
 */
async function checkLock(vault: Vault, state: DesktopState, keys: DesktopKeys, lease: LeasePayload): Promise<DesktopState> {
  const dir = vault.desktopDir(state.desktopId);
  if (await tokenMatches(dir, state.lockDigest)) return state;
  const rec = await readLockRecord(dir, keys.deviceKey, state.desktopId);
  const renewed = rec?.reason === 'expiry' && (!rec.leaseIssuedAt || Date.parse(lease.issuedAt) > Date.parse(rec.leaseIssuedAt));
  if (rec?.reason === 'admin-unlocked' || renewed) {
    const next = { ...state, lockDigest: await mintToken(dir) };
    await vault.save(next, keys);
    await rm(join(dir, LOCK), { force: true });
    return next;
  }
  const why = !rec
    ? 'its lock record is missing or was altered, so it stays locked until the administrator unlocks it'
    : rec.reason === 'admin'
      ? 'the administrator locked it; it opens when the administrator unlocks it'
      : 'its offline lease ran out without contact; a renewed lease opens it';
  throw new CarryonError('desktop-locked', `${state.name} is locked: ${why}`);
}

/**
 * Offline open: the wrap and the state authenticate (Vault.openKeys), then the lease must verify
 * against the pinned broker key and be unexpired by the trusted clock, and the desktop must not be
 * locked; only then are the keys (and so the LUKS secrets) handed out.
 */
export async function unlock(vault: Vault, device: DeviceIdentity, password: string, found: DesktopState): Promise<{ keys: DesktopKeys; lease: LeasePayload; state: DesktopState }> {
  return releaseKeys(vault, await vault.openKeys(device, password, found));
}

/** The policy gate in front of the keys (unlock). */
export async function releaseKeys(vault: Vault, opened: { keys: DesktopKeys; state: DesktopState }): Promise<{ keys: DesktopKeys; lease: LeasePayload; state: DesktopState }> {
  const { keys } = opened;
  const deviceId = leaseDevice(opened.state);
  const now = await trustedNow(vault, opened.state, keys);
  const lease = verifyLease(await currentLease(vault, opened.state, keys, deviceId), keys.brokerKey, { now, deviceId, desktopId: opened.state.desktopId });
  const state = await checkLock(vault, opened.state, keys, lease);
  return { keys, lease, state };
}

/** The device the check-out's lease names (MACed with the state, so it cannot be swapped). */
function leaseDevice(state: DesktopState): string {
  const payload = JSON.parse(Buffer.from(state.lease.payload, 'base64').toString('utf8')) as { deviceId?: unknown };
  if (typeof payload.deviceId !== 'string') throw new LeaseError('malformed', 'offline lease is malformed');
  return payload.deviceId;
}
