import { z } from 'zod';
import { ValidationError } from '../core/errors.js';
import { UsbClassCode, UsbIdPattern } from '../core/policy.js';

/**
 * The USB part of a desktop's policy as the laptop applies it. A desktop may be bound by several
 * rule sets at once (the check-out's, MACed in the vault; the one the agent learned since, which
 * can only take away): a device passes only when every set lets it.
 */
export const UsbRules = z.object({
  allowed: z.boolean(),
  classes: z.array(UsbClassCode).default(['*']),
  allow: z.array(UsbIdPattern).default([]),
  deny: z.array(UsbIdPattern).default([]),
  storage: z.boolean().default(true),
  /** USB printers (class 07): the printing policy's, not USB's (a check-out from before it: allowed, as then). */
  printers: z.boolean().default(true),
});
export type UsbRules = z.infer<typeof UsbRules>;

/** What the rules look at: the device's IDs and every class it declares (device and interfaces). */
export interface UsbIdentity {
  vendorId: string;
  productId: string;
  /** Two hex digits each; the device class only where it is not 00 ("see the interfaces"). */
  classes: string[];
}

export const STORAGE_CLASS = '08';
export const PRINTER_CLASS = '07';

const CLASS_NAMES: Record<string, string> = {
  '01': 'audio', '02': 'communications', '03': 'HID', '05': 'physical', '06': 'image', '07': 'printer', '08': 'storage', '09': 'hub',
  '0a': 'CDC data', '0b': 'smart card', '0d': 'content security', '0e': 'video', '0f': 'healthcare', '10': 'audio/video',
  'dc': 'diagnostic', 'e0': 'wireless', 'ef': 'miscellaneous', 'fe': 'application', 'ff': 'vendor-specific',
};

export function className(code: string): string {
  return CLASS_NAMES[code] ? `${CLASS_NAMES[code]} (${code})` : code;
}

/** Policy values as the broker sends them (heartbeat, check-out) → rules; missing keys keep their defaults. */
export function rulesFromPolicy(p: Record<string, unknown>): UsbRules {
  return UsbRules.parse({
    allowed: p.usbAllowed === true,
    classes: p.usbClasses,
    allow: p.usbAllow,
    deny: p.usbDeny,
    storage: p.usbStorageAllowed,
    printers: p.printingAllowed === true,
  });
}

const matches = (pattern: string, id: string) => pattern === id || (pattern.endsWith(':*') && id.startsWith(pattern.slice(0, 5)));

export type UsbDecision = { ok: true } | { ok: false; why: string };

/** Whether one rule set lets the device through, and if not, which rule stopped it. */
export function decideOne(rules: UsbRules, dev: UsbIdentity): UsbDecision {
  const id = `${dev.vendorId}:${dev.productId}`.toLowerCase();
  if (!rules.allowed) return { ok: false, why: 'USB is not allowed for this desktop' };
  if (rules.deny.some((p) => matches(p, id))) return { ok: false, why: `${id} is on the policy's deny list` };
  // Storage is checked on every interface: a composite device cannot hide a disk behind a keyboard.
  if (!rules.storage && dev.classes.includes(STORAGE_CLASS)) return { ok: false, why: `${id} is a mass-storage device and the policy does not allow USB storage` };
  if (!rules.printers && dev.classes.includes(PRINTER_CLASS)) return { ok: false, why: `${id} is a printer and the policy does not allow printing` };
  if (rules.allow.some((p) => matches(p, id))) return { ok: true };
  if (rules.classes.includes('*')) return { ok: true };
  const outside = dev.classes.filter((c) => !rules.classes.includes(c));
  // A device that declares no class at all says nothing the class list could allow.
  if (dev.classes.length === 0) return { ok: false, why: `${id} declares no USB class and is not on the policy's allow list` };
  if (outside.length) return { ok: false, why: `${id} has class ${outside.map(className).join(', ')}, which the policy does not allow` };
  return { ok: true };
}

/** Every rule set must let the device through. */
export function decide(sets: UsbRules[], dev: UsbIdentity): UsbDecision {
  if (sets.length === 0) return { ok: false, why: 'no USB policy is known for this desktop' };
  for (const r of sets) {
    const d = decideOne(r, dev);
    if (!d.ok) return d;
  }
  return { ok: true };
}

/** `046d:c52b` → its parts, lower case; a clear error for anything else. */
export function parseUsbId(text: string): { vendorId: string; productId: string } {
  const m = /^([0-9a-f]{4}):([0-9a-f]{4})$/i.exec(text.trim());
  if (!m) throw new ValidationError(`"${text}" is not a USB device ID: give it as VENDOR:PRODUCT in hex, e.g. 046d:c52b (carryon usb list shows them)`);
  return { vendorId: m[1]!.toLowerCase(), productId: m[2]!.toLowerCase() };
}
