import { z } from 'zod';
import { SignedLease } from '../../core/tokens/lease.js';
import type { Manifest } from '../../core/chunks/manifest.js';
import type { DesktopKeys } from './desktop-keys.js';

/** A desktop's record: its check-out, lease, config and, per disk, its layers and their shapes. */
const Hex64 = z.string().regex(/^[0-9a-f]{64}$/);
const LayerShapeRecord = z.object({ size: z.number().int(), sha256: Hex64 });
/** The two names a top layer's file alternates between. */
const TopFile = z.enum(['top.qcow2', 'top-b.qcow2']);
const FileStamp = z.object({ size: z.number().int(), mtimeMs: z.number(), ctimeMs: z.number(), ino: z.number() });

export const DesktopState = z.object({
  desktopId: z.string(),
  name: z.string(),
  user: z.string(),
  checkoutId: z.string(),
  state: z.enum(['transferring', 'checked_out', 'checking_in']),
  jobId: z.string().nullable(),
  keys: z.object({
    salt: z.string(), N: z.number().int(),
    /**
     * The keys under scrypt(device secret ‖ password, salt): what opens the vault offline. Absent
     * only for a check-out's first moments, while that KDF runs beside the transfer (the online
     * wrap opens it meanwhile; client/ops/checkout.ts).
     */
    wrapped: z.string().optional(),
    /** The same keys under the check-out's online unlock share (client/vault/online-unlock.ts); absent in vaults from before it. */
    online: z.string().optional(),
    /** The vault key sealed for a parked copy under the password's wrap key and salt, made at check-out so parking needs no KDF. */
    park: z.string().optional(),
  }),
  /** The lease that came with the check-out (renewals are in lease.json, signed by the broker). */
  lease: SignedLease,
  config: z.record(z.string(), z.unknown()),
  localConfig: z.record(z.string(), z.unknown()).default({}),
  /**
   * Per disk: the checkpoint its base layer holds, whether the base is complete (the check-out
   * filled it), and a merge of the top into the base that was begun and must be finished.
   */
  disks: z.array(z.object({
    name: z.string().regex(/^[A-Za-z0-9._-]{1,64}$/), baseDigest: Hex64, complete: z.boolean().default(false), mergingTo: Hex64.nullable().default(null),
    /** Each layer's size and structure digest at its last clean close (layer-guard.ts); null until first recorded. */
    shapes: z.object({ base: LayerShapeRecord.nullable(), top: LayerShapeRecord.nullable() }).default({ base: null, top: null }),
    /** The base file as it was when its every chunk last matched the checkpoint's chunk IDs. */
    baseVerified: FileStamp.nullable().default(null),
    /** The top file as its last clean close left it (a later write outside Carryon is reported). */
    topClosed: FileStamp.nullable().default(null),
    /** The active top layer's file: a live replica alternates between the two names (src/live/). */
    top: TopFile.default('top.qcow2'),
    /**
     * A live replica's frozen layer between base and top (the old top), while the replica runs or
     * its fold into the base does: with `mergingTo` the broker acknowledged it; without, it was not.
     */
    under: TopFile.nullable().default(null),
  })),
  lastReplicationAt: z.string().nullable().default(null),
  /** How the last replica was taken: with the guest's file systems frozen by its agent, or not. */
  lastReplicaKind: z.enum(['quiesced', 'crash-consistent', 'stopped']).nullable().default(null),
  /** SHA-256 of the unlock token (guards.ts): the desktop is unlocked only while that token exists. */
  lockDigest: Hex64,
  /** Vaults made before one LUKS secret per layer: both layers of a disk share one secret. */
  layerSecrets: z.enum(['one-per-disk', 'per-layer']).default('one-per-disk'),
  /** Set while a process may write the layers (run, serve); a crash leaves it set. */
  layersOpen: z.boolean().default(false),
  /** A base found not to match its checkpoint: nothing opens the disks until it is dealt with. */
  damaged: z.object({ at: z.string(), disk: z.string(), message: z.string() }).nullable().default(null),
  /** The snapshot of a committed check-in whose bases are being merged and parked (client/parked.ts): a rerun finishes that, nothing else. */
  parking: z.string().nullable().default(null),
});
export type DesktopState = z.infer<typeof DesktopState>;

/**
 * Where a desktop's record and checkpoints are kept, as the live chain sees it: the laptop's vault
 * (client/vault/vault.ts) implements it with a MACed state file under a password-wrapped key; a
 * desktop host can implement it without either. The chain never asks whether keys may be released.
 */
export interface DesktopRecords {
  /** The root under which templates, sockets' parents and events live. */
  readonly home: string;
  desktopDir(desktopId: string): string;
  manifest(desktopId: string, digest: string): Promise<Manifest>;
  /** Keeps a checkpoint's manifest (or its encoding) under its digest (returned). */
  putManifest(desktopId: string, m: Manifest | Uint8Array): Promise<string>;
  /** A manifest the caller holds, checked against `digest`, handed to the next `manifest` call for it (a cache of one read). */
  offerManifest?(desktopId: string, digest: string, m: Manifest): void;
  /** Stores the record (atomically, authenticated under `keys` where the store does that). */
  save(state: DesktopState, keys: DesktopKeys): Promise<void>;
}
