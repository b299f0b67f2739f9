import { spawn } from 'node:child_process';
import { createHash, randomBytes, type KeyObject } from 'node:crypto';
import { open, readFile, rm, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { z } from 'zod';
import { CarryonError } from '../../core/errors.js';
import { signBytes, verifyBytes } from '../../core/signing.js';
import { writeFileAtomic } from '../../files/atomic.js';
import { recordMac, recordMacOk, type DesktopKeys } from '../../live/disks/desktop-keys.js';
import { UsbRules } from '../../devices/usb-rules.js';

/**
 * The per-desktop files that carry offline policy, and how each fails closed:
 * - `unlock.token`: random bytes whose SHA-256 the MACed state holds. The agent (no password)
 *   locks by destroying it; nobody can make a new one without the vault key. Missing = locked.
 * - `lock.json`: why it is locked, signed by the device key (the agent's); the vault checks it
 *   against the device key pinned in the wrap. Missing or altered = locked by the administrator.
 * - `clock.json`: the latest trusted time, MACed with the vault key. Missing or altered = refused
 *   until an online login re-establishes it. The device's `agent-clock.json` (agent-clock.ts),
 *   which the agent advances without the password, is a second floor under it.
 * - `policy.json`: what the agent learned from the broker since check-out; it can only restrict.
 */
export const TOKEN = 'unlock.token';
export const LOCK = 'lock.json';
export const CLOCK = 'clock.json';
export const POLICY = 'policy.json';
export const LEASE = 'lease.json';

async function readOr<T>(path: string, fallback: T, parse: (text: string) => T): Promise<T> {
  try {
    return parse(await readFile(path, 'utf8'));
  } catch {
    return fallback;
  }
}

/** Writes a fresh unlock token; returns the digest the MACed state must hold. */
export async function mintToken(dir: string): Promise<string> {
  const token = randomBytes(32).toString('hex');
  await writeFileAtomic(join(dir, TOKEN), token);
  return createHash('sha256').update(token).digest('hex');
}

export async function tokenMatches(dir: string, digest: string): Promise<boolean> {
  const token = await readOr(join(dir, TOKEN), '', (t) => t.trim());
  return token !== '' && createHash('sha256').update(token).digest('hex') === digest;
}

/** Overwrites a small secret-bearing file before unlinking it (best effort on CoW filesystems). */
export async function shred(path: string): Promise<void> {
  try {
    const size = (await stat(path)).size;
    const fh = await open(path, 'r+');
    try {
      await fh.write(randomBytes(Math.max(size, 1)), 0, Math.max(size, 1), 0);
      await fh.sync();
    } finally {
      await fh.close();
    }
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err;
  }
  await rm(path, { force: true });
}

export const LockReason = z.enum(['admin', 'expiry', 'admin-unlocked']);
const LockPayload = z.object({ desktopId: z.string(), reason: LockReason, at: z.string(), leaseIssuedAt: z.string().nullable() });
export type LockRecord = z.infer<typeof LockPayload>;
const SignedRecord = z.object({ payload: z.string(), signature: z.string() });

/** The agent's lock: destroys the token first (that alone locks), then records why. */
export async function lockDesktop(dir: string, deviceKey: KeyObject, rec: LockRecord): Promise<void> {
  await shred(join(dir, TOKEN));
  await writeLockRecord(dir, deviceKey, rec);
}

export async function writeLockRecord(dir: string, deviceKey: KeyObject, rec: LockRecord): Promise<void> {
  const payload = Buffer.from(JSON.stringify(LockPayload.parse(rec)));
  await writeFileAtomic(join(dir, LOCK), JSON.stringify({ payload: payload.toString('base64'), signature: signBytes(deviceKey, payload) }));
}

/** The lock record if present and signed by `devicePub` for this desktop; null otherwise. */
export async function readLockRecord(dir: string, devicePub: KeyObject | null, desktopId: string): Promise<LockRecord | null> {
  return readOr(join(dir, LOCK), null, (text) => {
    const s = SignedRecord.parse(JSON.parse(text));
    const bytes = Buffer.from(s.payload, 'base64');
    if (devicePub && !verifyBytes(devicePub, bytes, s.signature)) return null;
    const rec = LockPayload.parse(JSON.parse(bytes.toString('utf8')));
    return rec.desktopId === desktopId ? rec : null;
  });
}

export async function isLockedByToken(dir: string, digest: string | undefined): Promise<boolean> {
  return !digest || !(await tokenMatches(dir, digest));
}

const ClockBody = z.object({
  lastSeen: z.iso.datetime(),
  tpm: z.object({ clock: z.number(), resetCount: z.number() }).nullable().default(null),
  /** The device clock record (agent-clock.ts) this desktop last took as a floor; null: none yet, so a missing one is not a removed one. */
  agentAt: z.iso.datetime().nullable().default(null),
});
export type ClockBody = z.infer<typeof ClockBody>;
const ClockFile = z.object({ body: z.string(), mac: z.string() });

/** The MACed trusted-clock record; refuses (never falls back to the system clock) when missing or altered. */
export async function readClock(dir: string, keys: DesktopKeys, desktopId: string, name: string): Promise<ClockBody> {
  const text = await readOr<string | null>(join(dir, CLOCK), null, (t) => t);
  const how = 'connect to the broker and run `carryon login` to re-establish trusted time';
  if (text === null) throw new CarryonError('clock-untrusted', `the trusted clock record of ${name} is missing: ${how}`);
  let file: z.infer<typeof ClockFile>;
  let body: ClockBody;
  try {
    file = ClockFile.parse(JSON.parse(text));
    body = ClockBody.parse(JSON.parse(file.body));
  } catch {
    throw new CarryonError('clock-untrusted', `the trusted clock record of ${name} is damaged: ${how}`);
  }
  if (!recordMacOk(keys, desktopId, 'clock', file.body, file.mac)) throw new CarryonError('clock-untrusted', `the trusted clock record of ${name} was altered outside Carryon: ${how}`);
  return body;
}

export async function writeClock(dir: string, keys: DesktopKeys, desktopId: string, body: z.input<typeof ClockBody>): Promise<void> {
  const text = JSON.stringify(ClockBody.parse(body));
  await writeFileAtomic(join(dir, CLOCK), JSON.stringify({ body: text, mac: recordMac(keys, desktopId, 'clock', text) }));
}

/** The clock record's time read without keys (the agent deciding whether to lock: a later time only locks sooner). */
export async function peekClock(dir: string): Promise<number> {
  return readOr(join(dir, CLOCK), 0, (t) => Date.parse(ClockBody.parse(JSON.parse(ClockFile.parse(JSON.parse(t)).body)).lastSeen) || 0);
}

/** What the agent last learned from the broker: older agents wrote `usbAllowed` alone. */
const PolicyFile = z.object({ usbAllowed: z.boolean(), usb: UsbRules.omit({ allowed: true, printers: true }).optional(), printingAllowed: z.boolean().optional() });
export type PolicyFile = z.infer<typeof PolicyFile>;

export async function writePolicy(dir: string, policy: PolicyFile): Promise<void> {
  await writeFileAtomic(join(dir, POLICY), JSON.stringify(PolicyFile.parse(policy)));
}

async function readPolicyFile(dir: string): Promise<PolicyFile | null> {
  return readOr<PolicyFile | null>(join(dir, POLICY), null, (t) => PolicyFile.parse(JSON.parse(t)));
}

/**
 * The desktop config to run with: the broker's config from check-out (MACed), restricted by what
 * the agent has learned since. An unauthenticated file can only take a permission away.
 */
export async function effectiveConfig(dir: string, config: Record<string, unknown>): Promise<Record<string, unknown>> {
  const p = await readPolicyFile(dir);
  return { ...config, usb: config.usb === true && p?.usbAllowed !== false, printing: config.printing !== false && p?.printingAllowed !== false };
}

/**
 * The USB rule sets a device must pass, all of them (devices/usb-rules.ts): the check-out's, MACed
 * in the vault (a check-out from before the rules existed: `usb` alone, any device), and the
 * agent's since, read again at every decision so a change applies to the running desktop.
 */
export async function usbRuleSets(dir: string, config: Record<string, unknown>): Promise<UsbRules[]> {
  const fromCheckout = UsbRules.safeParse({ allowed: config.usb === true, ...(typeof config.usbRules === 'object' && config.usbRules ? config.usbRules : {}), printers: config.printing !== false });
  // A MACed config whose rules do not read (a newer broker's shape): nothing passes, rather than everything.
  const sets: UsbRules[] = [fromCheckout.success ? fromCheckout.data : { allowed: false, classes: [], allow: [], deny: [], storage: false, printers: false }];
  const p = await readPolicyFile(dir);
  if (p) sets.push({ allowed: p.usbAllowed, ...(p.usb ?? { classes: ['*'], allow: [], deny: [], storage: true }), printers: p.printingAllowed !== false });
  return sets;
}

/** Local (user) settings that change presentation only; policy keys (usb, nic, RAM…) are dropped. */
const PRESENTATION = ['display', 'monitors', 'keyboard', 'usbDevices'] as const;
export function presentationOnly(local: Record<string, unknown>): Record<string, unknown> {
  // usbDevices only picks devices; whether any pass through is the broker's `usb`.
  return Object.fromEntries(Object.entries(local).filter(([k]) => (PRESENTATION as readonly string[]).includes(k)));
}

/**
 * Removes everything in `trash` (crypto-erased desktops) in a detached `rm`, so the command that
 * erased them need not wait for the file system to free their blocks. Best effort: what it
 * leaves is swept by the next `Vault.open`.
 */
export function emptyTrash(trash: string): void {
  try {
    const child = spawn('sh', ['-c', 'for d in "$1"/*; do [ -e "$d" ] && rm -rf --one-file-system -- "$d"; done; true', 'carryon-trash', trash], { detached: true, stdio: 'ignore' });
    child.on('error', () => undefined);
    child.unref();
  } catch {
    // No shell here: the next open tries again.
  }
}
