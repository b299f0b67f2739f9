import { createHmac, hkdfSync, timingSafeEqual } from 'node:crypto';
import { chunkIdToBytes, type ChunkId } from '../chunk-id.js';

/**
 * Push receipts: a transfer server's word that a check-out pushed a chunk (decision 53). The
 * server names each chunk it rebuilds from a check-in's pages and returns, with the name,
 * HMAC(receipt key, checkout ‖ lineage ‖ chunk ID); the commit must carry one for each new chunk
 * outside the checkpoint. Without it a user could commit any chunk ID the shared store holds
 * (another desktop's, then check it out) and learn from the commit's answer which exist.
 * The key is derived from the master key the broker and its transfer servers already share.
 */
export type ReceiptKey = Buffer & { readonly receiptKey: unique symbol };

const INFO = 'carryon push-receipt v1';
/**
 * HMAC-SHA-256 truncated to 128 bits (a forgery still needs ≈ 2^128 tries, each one a refused
 * commit): a commit carries one per new chunk, inline. 300 k changes are 22.7 MB of JSON bare,
 * 30.2 MB with these; full 32-byte receipts in a map of their own would have been 56.6 MB, past
 * the broker's 32 MiB body limit.
 */
export const RECEIPT_BYTES = 16;
/** base64url of 16 bytes. */
export const RECEIPT_RE = /^[A-Za-z0-9_-]{22}$/;

export function receiptKey(masterKey: Uint8Array): ReceiptKey {
  return Buffer.from(hkdfSync('sha256', masterKey, Buffer.alloc(0), INFO, 32)) as ReceiptKey;
}

/** What a receipt binds: the check-out (any of its upload jobs, so a resumed check-in keeps them), its lineage, the chunk. */
export interface ReceiptSubject {
  checkoutId: string;
  /** The ticket's key context (`lineage:<id>`). */
  keyContext: string;
  id: ChunkId;
}

function mac(key: ReceiptKey, s: ReceiptSubject): Buffer {
  const h = createHmac('sha256', key);
  // Length-prefixed, so no two subjects share an encoding.
  for (const part of [Buffer.from(s.checkoutId), Buffer.from(s.keyContext), chunkIdToBytes(s.id)]) {
    const len = Buffer.alloc(4);
    len.writeUInt32BE(part.length);
    h.update(len).update(part);
  }
  return h.digest().subarray(0, RECEIPT_BYTES);
}

export function pushReceipt(key: ReceiptKey, s: ReceiptSubject): string {
  return mac(key, s).toString('base64url');
}

export function receiptHolds(key: ReceiptKey, s: ReceiptSubject, receipt: string | undefined): boolean {
  if (!receipt || !RECEIPT_RE.test(receipt)) return false;
  return timingSafeEqual(mac(key, s), Buffer.from(receipt, 'base64url'));
}

export function receiptToBytes(receipt: string): Buffer {
  const b = Buffer.from(receipt, 'base64url');
  if (!RECEIPT_RE.test(receipt) || b.length !== RECEIPT_BYTES) throw new Error('not a push receipt');
  return b;
}

export function receiptFromBytes(bytes: Uint8Array): string {
  return Buffer.from(bytes).toString('base64url');
}
