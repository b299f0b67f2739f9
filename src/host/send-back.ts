import { join } from 'node:path';
import type { ChunkId } from '../core/chunk-id.js';
import type { LineageKeys } from '../core/keys.js';
import type { Manifest } from '../core/chunks/manifest.js';
import { topExtents, type Chain } from '../disk/chain.js';
import { addChain, StorageDaemon } from '../disk/storage-daemon.js';
import { NbdClient } from '../nbd/client.js';
import { pushPages } from '../transfer-client/push-pages.js';
import type { TransferEndpoint } from '../transfer-client/client.js';
import { namedOutcome, pagesSource, touchedChunks, type DiskChanges, type DiskReader, type ReadDisk } from '../live/disks/changes.js';

export interface SendBackDisk {
  name: string;
  chain: Chain;
  /** The manifest of the snapshot the guest started from (what the host's base holds). */
  base: Manifest;
}

/**
 * Sends what a stopped guest wrote on the host, as a laptop's check-in does (client/changes.ts,
 * transfer/push-pages.ts): only the pages its top layers hold travel, against the snapshot's
 * chunks; the transfer server names the chunks it rebuilds, each with a push receipt; `commit`
 * gets the changes with their receipts inline (`[index, id, receipt?]`).
 */
export async function sendBack(o: { disks: SendBackDisk[]; socketDir: string; endpoint: TransferEndpoint; renew: () => Promise<TransferEndpoint>; keys: LineageKeys; commit: (disks: { name: string; changes: (string | number | null)[][] }[]) => Promise<unknown> }): Promise<{ changedChunks: number; chunksMoved: number; bytesMoved: number }> {
  const maps = o.disks.map((d) => topExtents(d.chain));
  for (const m of maps) m.catch(() => undefined);
  const qsd = await StorageDaemon.start(o.socketDir);
  const clients: NbdClient[] = [];
  try {
    for (const [i, d] of o.disks.entries()) {
      await addChain(qsd, { files: d.chain.files, secretId: `sec-d${i}`, baseSecretId: `sec-d${i}-base`, baseReadOnly: true, prefix: `d${i}`, readOnly: true }, d.chain.secret, d.chain.baseSecret);
    }
    const socket = join(o.socketDir, 'send-back.sock');
    await qsd.exportNbd(socket, o.disks.map((d, i) => ({ node: `d${i}-top`, name: d.name, writable: false })));
    const readers: DiskReader<ReadDisk>[] = [];
    for (const [i, d] of o.disks.entries()) {
      const top = await NbdClient.connect(socket, d.name);
      clients.push(top);
      readers.push({ disk: { name: d.name, base: d.base }, top, extents: await maps[i]! });
    }
    return await sendPages({ ...o, readers });
  } finally {
    for (const c of clients) await c.close();
    await qsd.stop();
  }
}

/**
 * The pages the readers' tops hold, pushed against their bases' chunks, then `commit` with the
 * changes and their receipts. Shared by the handover (a stopped guest's chain) and the background
 * replica (the frozen layer QEMU exports, replica.ts).
 */
export async function sendPages(o: { readers: DiskReader<ReadDisk>[]; endpoint: TransferEndpoint; renew: () => Promise<TransferEndpoint>; keys: LineageKeys; commit: (disks: { name: string; changes: (string | number | null)[][] }[]) => Promise<unknown> }): Promise<{ changedChunks: number; chunksMoved: number; bytesMoved: number; changes: DiskChanges[] }> {
  const touched = touchedChunks(o.readers);
  const named = new Map<number, ChunkId | null>();
  const receipts = new Map<ChunkId, string>();
  const sent = await pushPages({ endpoint: o.endpoint, count: touched.length, source: pagesSource(touched, o.keys), named, receipts, renew: o.renew });
  const outcome = namedOutcome(o.readers, touched, named);
  await o.commit(withReceipts(outcome.changes, receipts));
  return { changes: outcome.changes, changedChunks: outcome.changedChunks, chunksMoved: sent.chunksMoved, bytesMoved: sent.bytesMoved };
}

function withReceipts(changes: DiskChanges[], receipts: ReadonlyMap<string, string>) {
  return changes.map((d) => ({ name: d.name, changes: d.changes.map(([index, id]) => (id && receipts.get(id) ? [index, id, receipts.get(id)!] : [index, id])) }));
}
