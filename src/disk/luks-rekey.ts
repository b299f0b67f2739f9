import { randomBytes } from 'node:crypto';
import { open, type FileHandle } from 'node:fs/promises';
import { DiskError } from './block-device.js';
import { luksHeaderRange } from './qcow2/qcow2-format.js';
import { addLuksSlot, keepOnlySlot, LUKS_SLOTS, openAnyLuksSlot, slotActive, slotMaterial } from './luks-header.js';

/**
 * A layer handed from one vault to another (a parked base, client/parked.ts) changes passphrase
 * without rewriting its data: the volume key stays, only the key slots change. Two steps, each
 * safe to cut at any point and to run again:
 * 1. `addPassphrase`: the new passphrase goes into a free slot (material synced before the
 *    header that activates it); the old one still opens the layer.
 * 2. `keepOnlyPassphrase`: every other slot is disabled (one header write), then its material is
 *    overwritten with random bytes.
 * The slots used (0–5) have their fields in the header's first sector, so a header write is one
 * 512-byte write.
 */

async function readHeader(fh: FileHandle, path: string): Promise<{ at: number; luks: Buffer }> {
  const range = await luksHeaderRange(fh);
  if (!range) throw new DiskError('state', `${path} has no LUKS header`);
  const luks = Buffer.alloc(range.length);
  const { bytesRead } = await fh.read(luks, 0, luks.length, range.offset);
  if (bytesRead !== luks.length) throw new DiskError('state', `${path}: its LUKS header is cut short`);
  return { at: range.offset, luks };
}

/** Adds `next` beside `current` (no-op when `next` already opens it). Throws when `current` does not open it. */
export async function addPassphrase(path: string, current: string, next: string): Promise<void> {
  const fh = await open(path, 'r+');
  try {
    const { at, luks } = await readHeader(fh, path);
    // Each try is a slot's anti-forensic merge (≈ 10 ms cold). A parked layer has one slot, the
    // current passphrase's; `next` is there already only after a rerun (two slots, or one once
    // the old one was removed): tried first only when two are active, else only if `current` fails.
    const active = activeSlots(luks).length;
    if (active > 1 && openAnyLuksSlot(luks, Buffer.from(next, 'utf8'), addedSlot(luks))) return;
    const opened = openAnyLuksSlot(luks, Buffer.from(current, 'utf8'));
    if (!opened) {
      if (active === 1 && openAnyLuksSlot(luks, Buffer.from(next, 'utf8'))) return;
      throw new DiskError('state', `${path}: the parked passphrase does not open its LUKS header`);
    }
    const free = successorSlot(luks, opened.slot);
    if (free < 0) throw new DiskError('state', `${path}: no free LUKS key slot`);
    const { header, material, offset } = addLuksSlot(luks, free, opened.key, Buffer.from(next, 'utf8'));
    opened.key.fill(0);
    await fh.write(material, 0, material.length, at + offset);
    await fh.datasync();
    await fh.write(header, 0, 512, at);
    await fh.datasync();
  } finally {
    await fh.close();
  }
}

/**
 * Slots 0–5 only are filled here: their fields end at byte 496, so activating one is a
 * single-sector write. A new passphrase goes into the first free one after the slot of the
 * passphrase it joins, cyclically: with two active, the added one is then the other's successor
 * (`addedSlot`), and the take-over's later steps open the right slot first instead of trying the
 * parked passphrase's (each try a key derivation and an anti-forensic merge, ≈ 10–30 ms).
 */
const FILLED_SLOTS = 6;

/** The first free slot after `slot`, cyclically among those filled here; -1 when none is free. */
export function successorSlot(luks: Buffer, slot: number): number {
  for (let i = 1; i <= FILLED_SLOTS; i++) {
    const s = (slot + i) % FILLED_SLOTS;
    if (!slotActive(luks, s)) return s;
  }
  return -1;
}

/** With exactly two slots active, the one added after the other (its cyclic successor); else undefined. */
export function addedSlot(luks: Buffer): number | undefined {
  const active = activeSlots(luks);
  if (active.length !== 2 || active[1]! >= FILLED_SLOTS) return undefined;
  const [a, b] = active as [number, number];
  return (a + 1) % FILLED_SLOTS === b ? b : (b + 1) % FILLED_SLOTS === a ? a : undefined;
}

/** The key slots in use. */
const activeSlots = (luks: Buffer): number[] => Array.from({ length: LUKS_SLOTS }, (_, s) => s).filter((s) => slotActive(luks, s));

/** Leaves only the slot `keep` opens; the others' material is overwritten. Throws when `keep` does not open it. */
export async function keepOnlyPassphrase(path: string, keep: string): Promise<void> {
  const fh = await open(path, 'r+');
  try {
    const { at, luks } = await readHeader(fh, path);
    // The passphrase kept is the one a take-over added: looked for in its slot first.
    const opened = openAnyLuksSlot(luks, Buffer.from(keep, 'utf8'), addedSlot(luks));
    if (!opened) throw new DiskError('state', `${path}: the passphrase does not open its LUKS header`);
    opened.key.fill(0);
    const others = activeSlots(luks).filter((s) => s !== opened.slot);
    if (others.length === 0) return;
    const header = keepOnlySlot(luks, opened.slot);
    await fh.write(header, 0, header.length, at);
    await fh.datasync();
    for (const s of others) {
      const { offset, length } = slotMaterial(luks, s);
      await fh.write(randomBytes(length), 0, length, at + offset);
    }
    await fh.datasync();
  } finally {
    await fh.close();
  }
}

/** The LUKS header's UUID (random per layer, kept by a re-key): tells a moved layer from a newly made one. */
export async function luksUuid(path: string): Promise<string> {
  const fh = await open(path, 'r');
  try {
    const { luks } = await readHeader(fh, path);
    const raw = luks.subarray(168, 208);
    const end = raw.indexOf(0);
    return raw.subarray(0, end < 0 ? raw.length : end).toString('latin1');
  } finally {
    await fh.close();
  }
}
