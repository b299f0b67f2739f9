import { createCipheriv, createDecipheriv, createHash, hash as cryptoHash, pbkdf2Sync, randomBytes, randomUUID } from 'node:crypto';
import { diffuseSha256 } from './sha256-short.js';
import { afChainSha256 } from './af-sha256-wasm.js';
import { XtsSectors } from './qcow2/xts.js';

/**
 * Fresh LUKS1 key material for an image whose header layout is already made (by QEMU).
 *
 * Why: QEMU creates a LUKS header only after benchmarking PBKDF2 twice (≈ 1 s of CPU each, and
 * it fails now and then on a busy machine with "Unable to get accurate CPU usage"). Our
 * passphrases are 256-bit key material, so the stretching buys nothing. A layer is therefore
 * made from a QEMU-created template: its qcow2 structure and LUKS layout are kept, and every
 * secret field — volume key, digest salt, key-slot salt and key material, UUID — is replaced
 * here, following the LUKS1 on-disk format (cryptsetup's "LUKS On-Disk Format Specification
 * 1.2.3"): PBKDF2 for the digest and the slot key, AF-split with 4000 stripes, and the slot
 * encrypted with the volume's cipher (aes-xts-plain64) sector by sector. QEMU then opens the
 * image like any other LUKS image and checks the digest.
 */

const MAGIC = Buffer.from([0x4c, 0x55, 0x4b, 0x53, 0xba, 0xbe]);
const PHDR_SIZE = 592;
const SLOT_BASE = 208;
const SLOT_SIZE = 48;
const SLOTS = 8;
const SLOT_ACTIVE = 0x00ac71f3;
const SLOT_INACTIVE = 0x0000dead;
const SECTOR = 512;
/** Minimum iterations QEMU itself would use; the passphrase is already a 256-bit key. */
export const LUKS_ITERATIONS = 1000;

export class LuksHeaderError extends Error {}

export interface LuksLayout {
  keyBytes: number;
  hash: string;
  /** Key material of slot 0, relative to the header's start. */
  slotOffset: number;
  stripes: number;
}

function cString(buf: Buffer, at: number, len: number): string {
  const raw = buf.subarray(at, at + len);
  const end = raw.indexOf(0);
  return raw.subarray(0, end < 0 ? len : end).toString('latin1');
}

/** Reads (and checks) the layout this module knows how to re-key: LUKS1, aes-xts-plain64, sha-family hash. */
export function readLuksLayout(header: Buffer): LuksLayout {
  if (header.length < PHDR_SIZE || !header.subarray(0, 6).equals(MAGIC)) throw new LuksHeaderError('not a LUKS header');
  if (header.readUInt16BE(6) !== 1) throw new LuksHeaderError(`LUKS version ${header.readUInt16BE(6)} (expected 1)`);
  const cipher = cString(header, 8, 32);
  const mode = cString(header, 40, 32);
  const hash = cString(header, 72, 32);
  if (cipher !== 'aes' || mode !== 'xts-plain64') throw new LuksHeaderError(`cipher ${cipher}-${mode} (expected aes-xts-plain64)`);
  if (!/^sha(1|256|512)$/.test(hash)) throw new LuksHeaderError(`hash ${hash}`);
  const keyBytes = header.readUInt32BE(108);
  if (keyBytes !== 64) throw new LuksHeaderError(`${keyBytes}-byte volume key (expected 64: AES-256-XTS)`);
  const slotOffset = header.readUInt32BE(SLOT_BASE + 40) * SECTOR;
  const stripes = header.readUInt32BE(SLOT_BASE + 44);
  if (stripes !== 4000) throw new LuksHeaderError(`${stripes} stripes in slot 0 (expected 4000)`);
  if (slotOffset < PHDR_SIZE) throw new LuksHeaderError('slot 0 key material overlaps the header');
  return { keyBytes, hash, slotOffset, stripes };
}

/** LUKS1's diffuse step: each digest-sized piece of `block` is hashed with its big-endian index in front, into `out`. */
function diffuse(block: Buffer, out: Buffer, hash: string): void {
  // QEMU's default hash (every layer Carryon makes): hashed here, not through crypto (sha256-short.ts).
  if (hash === 'sha256') return diffuseSha256(block, out);
  const digest = digestLength(hash);
  // One-shot hashes of (counter ‖ piece) in one reused buffer: a Hash object per 32-byte piece was
  // most of a check-out's key-slot work (4000 stripes × 2 pieces per re-keyed layer).
  const input = Buffer.alloc(4 + digest);
  for (let i = 0, at = 0; at < block.length; i++, at += digest) {
    const len = Math.min(digest, block.length - at);
    input.writeUInt32BE(i);
    block.copy(input, 4, at, at + len);
    cryptoHash(hash, input.subarray(0, 4 + len), 'buffer').copy(out, at, 0, len);
  }
}

const digestLengths = new Map<string, number>();
function digestLength(hash: string): number {
  let n = digestLengths.get(hash);
  if (n === undefined) digestLengths.set(hash, (n = createHash(hash).digest().length));
  return n;
}

/** Anti-forensic split of `key` into `stripes` blocks: all but the last are random. */
export function afSplit(key: Buffer, stripes: number, hash: string): Buffer {
  const out = randomBytes(key.length * stripes);
  const d = (hash === 'sha256' && key.length === 64 ? afChainSha256(out, stripes) : null) ?? afChainJs(out, key.length, stripes, hash);
  const last = out.subarray((stripes - 1) * key.length);
  for (let j = 0; j < key.length; j++) last[j] = d[j]! ^ key[j]!;
  d.fill(0);
  return out;
}

/** Inverse of afSplit: the volume key from a slot's (decrypted) key material. */
export function afMerge(material: Buffer, keyBytes: number, stripes: number, hash: string): Buffer {
  const d = (hash === 'sha256' && keyBytes === 64 ? afChainSha256(material, stripes) : null) ?? afChainJs(material, keyBytes, stripes, hash);
  const last = material.subarray((stripes - 1) * keyBytes);
  const key = Buffer.alloc(keyBytes);
  for (let j = 0; j < keyBytes; j++) key[j] = d[j]! ^ last[j]!;
  d.fill(0);
  return key;
}

/** The anti-forensic chain in JavaScript (other hashes, or no WebAssembly): d = diffuse(d ⊕ stripe) over all stripes but the last. */
export function afChainJs(material: Buffer, keyBytes: number, stripes: number, hash: string): Buffer {
  const d = Buffer.alloc(keyBytes);
  const next = Buffer.alloc(keyBytes);
  for (let i = 0; i < stripes - 1; i++) {
    const at = i * keyBytes;
    for (let j = 0; j < keyBytes; j++) d[j]! ^= material[at + j]!;
    diffuse(d, next, hash);
    next.copy(d);
  }
  next.fill(0);
  return d;
}

/** aes-xts-plain64 over whole sectors numbered from 0 (how LUKS1 encrypts key material). */
export function xtsSectors(key: Buffer, data: Buffer, decrypt = false): Buffer {
  // In bulk where it can (500 sectors per slot: a cipher object each cost 3–14 ms of a command's first key slot).
  if (key.length === 64 && data.length % SECTOR === 0 && XtsSectors.available()) {
    const view = new XtsSectors(key)[decrypt ? 'decryptView' : 'encryptView'](data, 0);
    const out = Buffer.from(view);
    view.fill(0);
    return out;
  }
  const out = Buffer.alloc(data.length);
  for (let at = 0, sector = 0; at < data.length; at += SECTOR, sector++) {
    const iv = Buffer.alloc(16);
    iv.writeBigUInt64LE(BigInt(sector));
    const c = decrypt ? createDecipheriv('aes-256-xts', key, iv) : createCipheriv('aes-256-xts', key, iv);
    const n = Math.min(SECTOR, data.length - at);
    c.update(data.subarray(at, at + n)).copy(out, at);
    c.final();
  }
  return out;
}

export interface RekeyedHeader {
  /** The new 592-byte header. */
  header: Buffer;
  /** The new slot-0 key material, to be written at `layout.slotOffset` from the header's start. */
  material: Buffer;
  layout: LuksLayout;
}

/**
 * New secrets in an existing LUKS1 header layout: a random 512-bit volume key behind slot 0,
 * opened by `passphrase`; slots 1–7 disabled. Only the layout (cipher, offsets, stripes,
 * payload offset) is taken from `template`.
 */
export function rekeyLuksHeader(template: Buffer, passphrase: Buffer): RekeyedHeader {
  const layout = readLuksLayout(template);
  const header = Buffer.from(template.subarray(0, PHDR_SIZE));
  const volumeKey = randomBytes(layout.keyBytes);
  const digestSalt = randomBytes(32);
  pbkdf2Sync(volumeKey, digestSalt, LUKS_ITERATIONS, 20, layout.hash).copy(header, 112);
  digestSalt.copy(header, 132);
  header.writeUInt32BE(LUKS_ITERATIONS, 164);
  header.fill(0, 168, 208);
  header.write(randomUUID(), 168, 'latin1');
  for (let i = 0; i < SLOTS; i++) {
    const at = SLOT_BASE + i * SLOT_SIZE;
    if (i === 0) continue;
    header.writeUInt32BE(SLOT_INACTIVE, at);
    header.writeUInt32BE(0, at + 4);
    header.fill(0, at + 8, at + 40);
  }
  const slotSalt = randomBytes(32);
  header.writeUInt32BE(SLOT_ACTIVE, SLOT_BASE);
  header.writeUInt32BE(LUKS_ITERATIONS, SLOT_BASE + 4);
  slotSalt.copy(header, SLOT_BASE + 8);
  const slotKey = pbkdf2Sync(passphrase, slotSalt, LUKS_ITERATIONS, layout.keyBytes, layout.hash);
  const material = xtsSectors(slotKey, afSplit(volumeKey, layout.stripes, layout.hash));
  volumeKey.fill(0);
  slotKey.fill(0);
  return { header, material, layout };
}

/** Opens slot 0 with `passphrase` and checks the digest: the volume key, or null (tests, diagnostics). */
export function openLuksSlot(header: Buffer, material: Buffer, passphrase: Buffer): Buffer | null {
  const layout = readLuksLayout(header);
  const slotKey = pbkdf2Sync(passphrase, header.subarray(SLOT_BASE + 8, SLOT_BASE + 40), header.readUInt32BE(SLOT_BASE + 4), layout.keyBytes, layout.hash);
  const split = xtsSectors(slotKey, material.subarray(0, layout.keyBytes * layout.stripes), true);
  const key = afMerge(split, layout.keyBytes, layout.stripes, layout.hash);
  const digest = pbkdf2Sync(key, header.subarray(132, 164), header.readUInt32BE(164), 20, layout.hash);
  return digest.equals(header.subarray(112, 132)) ? key : null;
}

/** Key slot `slot`'s material area, relative to the header's start (QEMU lays out all eight at creation). */
export function slotMaterial(header: Buffer, slot: number): { offset: number; length: number; stripes: number } {
  const layout = readLuksLayout(header);
  const at = SLOT_BASE + slot * SLOT_SIZE;
  const offset = header.readUInt32BE(at + 40) * SECTOR;
  const stripes = header.readUInt32BE(at + 44);
  if (offset < PHDR_SIZE || stripes !== layout.stripes) throw new LuksHeaderError(`key slot ${slot} has no usable material area`);
  return { offset, length: Math.ceil((layout.keyBytes * stripes) / SECTOR) * SECTOR, stripes };
}

export function slotActive(header: Buffer, slot: number): boolean {
  return header.readUInt32BE(SLOT_BASE + slot * SLOT_SIZE) === SLOT_ACTIVE;
}

/** Opens key slot `slot` with `passphrase` and checks the digest: the volume key, or null. `header` spans the whole key-material area. */
export function openLuksSlotAt(header: Buffer, slot: number, passphrase: Buffer): Buffer | null {
  if (!slotActive(header, slot)) return null;
  const layout = readLuksLayout(header);
  const at = SLOT_BASE + slot * SLOT_SIZE;
  const { offset } = slotMaterial(header, slot);
  const slotKey = pbkdf2Sync(passphrase, header.subarray(at + 8, at + 40), header.readUInt32BE(at + 4), layout.keyBytes, layout.hash);
  const split = xtsSectors(slotKey, header.subarray(offset, offset + layout.keyBytes * layout.stripes), true);
  const key = afMerge(split, layout.keyBytes, layout.stripes, layout.hash);
  const digest = pbkdf2Sync(key, header.subarray(132, 164), header.readUInt32BE(164), 20, layout.hash);
  return digest.equals(header.subarray(112, 132)) ? key : null;
}

/**
 * The first active slot `passphrase` opens: its number and the volume key, or null. Each active
 * slot tried costs its key derivation and anti-forensic merge: a caller that knows which slot
 * should open names it as `first`.
 */
export function openAnyLuksSlot(header: Buffer, passphrase: Buffer, first?: number): { slot: number; key: Buffer } | null {
  const order = first === undefined || first < 0 || first >= SLOTS ? [] : [first];
  for (let slot = 0; slot < SLOTS; slot++) if (slot !== first) order.push(slot);
  for (const slot of order) {
    const key = openLuksSlotAt(header, slot, passphrase);
    if (key) return { slot, key };
  }
  return null;
}

/**
 * Slot `slot` filled for `passphrase` around an existing volume key: the new 592-byte header
 * (that slot active, the others as they were) and the slot's key material.
 */
export function addLuksSlot(header: Buffer, slot: number, volumeKey: Buffer, passphrase: Buffer): { header: Buffer; material: Buffer; offset: number } {
  const layout = readLuksLayout(header);
  const { offset, stripes } = slotMaterial(header, slot);
  const out = Buffer.from(header.subarray(0, PHDR_SIZE));
  const at = SLOT_BASE + slot * SLOT_SIZE;
  const salt = randomBytes(32);
  out.writeUInt32BE(SLOT_ACTIVE, at);
  out.writeUInt32BE(LUKS_ITERATIONS, at + 4);
  salt.copy(out, at + 8);
  const slotKey = pbkdf2Sync(passphrase, salt, LUKS_ITERATIONS, layout.keyBytes, layout.hash);
  const material = xtsSectors(slotKey, afSplit(volumeKey, stripes, layout.hash));
  slotKey.fill(0);
  return { header: out, material, offset };
}

/** The 592-byte header with every slot but `keep` disabled (their material is the caller's to overwrite). */
export function keepOnlySlot(header: Buffer, keep: number): Buffer {
  const out = Buffer.from(header.subarray(0, PHDR_SIZE));
  for (let i = 0; i < SLOTS; i++) {
    if (i === keep) continue;
    const at = SLOT_BASE + i * SLOT_SIZE;
    out.writeUInt32BE(SLOT_INACTIVE, at);
    out.writeUInt32BE(0, at + 4);
    out.fill(0, at + 8, at + 40);
  }
  return out;
}

export const LUKS_SLOTS = SLOTS;
