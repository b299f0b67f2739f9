import { randomBytes } from 'node:crypto';
import { join } from 'node:path';
import type { Chain } from '../../src/disk/chain.js';
import { addChain, StorageDaemon } from '../../src/disk/storage-daemon.js';
import { NbdClient } from '../../src/nbd/client.js';
import { sealChunk } from '../../src/core/chunks/blob.js';
import type { ChunkId } from '../../src/core/chunk-id.js';
import { isZero, splitChunks } from '../../src/core/chunks/chunking.js';
import { generateLineageKeys, type LineageKeys } from '../../src/core/keys.js';
import { createManifest, type Manifest } from '../../src/core/chunks/manifest.js';
import type { ChunkStore } from '../../src/store/chunk-store.js';

/** A raw image with data chunks, all-zero chunks and a partial last chunk, imported into `store`. */
export function makeImage(size: number, chunkSize: number): Buffer {
  const img = Buffer.alloc(size);
  for (let off = 0, i = 0; off < size; off += chunkSize, i++) {
    if (i % 3 === 1) continue; // hole
    randomBytes(Math.min(chunkSize, size - off)).copy(img, off);
  }
  return img;
}

export async function importRaw(
  store: ChunkStore,
  img: Buffer,
  chunkSize: number,
  keys: LineageKeys = generateLineageKeys(),
): Promise<{ keys: LineageKeys; manifest: Manifest }> {
  const ids: (ChunkId | null)[] = [];
  for (const part of splitChunks(img, chunkSize)) {
    if (isZero(part)) {
      ids.push(null);
      continue;
    }
    const sealed = sealChunk(keys, part);
    await store.put(sealed.id, sealed.blob, { defer: true });
    ids.push(sealed.id);
  }
  await store.sync();
  return { keys, manifest: createManifest(chunkSize, img.length, ids) };
}

/** Runs `fn` with an NBD client writing through `chain`'s top (a storage daemon in `dir`, as a guest writes), flushed and stopped after. */
export async function throughChain(dir: string, chain: Chain, fn: (nbd: NbdClient) => Promise<void>): Promise<void> {
  const qsd = await StorageDaemon.start(dir);
  try {
    await addChain(qsd, { files: chain.files, secretId: 's-top', baseSecretId: 's-base', prefix: 'c' }, chain.secret, chain.baseSecret);
    const socket = join(dir, 'nbd.sock');
    await qsd.exportNbd(socket, [{ node: 'c-top', name: 'disk', writable: true }]);
    const nbd = await NbdClient.connect(socket, 'disk');
    await fn(nbd);
    await nbd.flush();
    await nbd.close();
  } finally {
    await qsd.stop();
  }
}
