import { z } from 'zod';
import { isChunkId } from '../../core/chunk-id.js';
import { RECEIPT_RE } from '../../core/tokens/push-receipt.js';
import type { DiskChanges } from '../upload-rules.js';

const DiskName = z.string().min(1).max(64);
/**
 * Commit: per disk, chunk index → new ID (null: a hole) and, for a new chunk, the push receipt its
 * transfer server gave: `[index, id, receipt?]` (inline, so the ID is not sent twice). The same
 * wire shape for a laptop's check-in, replica and hand-back and a host's handover.
 */
const Change = z.tuple([z.number().int().min(0).max(2 ** 31), z.string().refine(isChunkId, 'not a chunk ID').nullable()], z.string().regex(RECEIPT_RE, 'not a push receipt'))
  .refine((c) => c.length <= 3, 'a change is [index, id, receipt?]');
export const Changes = z.object({
  disks: z.array(z.object({ name: DiskName, changes: z.array(Change).max(1 << 20) }).strict()).max(16).optional(),
}).strict();

/** The commit's changes as the broker applies them, and the receipts they carried, by chunk ID. */
export function withReceipts(disks: z.infer<typeof Changes>['disks'] = []): { changes: DiskChanges[]; receipts: Record<string, string> } {
  const receipts: Record<string, string> = {};
  const changes = disks.map((d) => ({
    name: d.name,
    changes: d.changes.map(([index, id, receipt]): [number, string | null] => {
      if (id && receipt) receipts[id] = receipt;
      return [index, id];
    }),
  }));
  return { changes, receipts };
}
