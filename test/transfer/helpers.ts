import { randomBytes } from 'node:crypto';
import { join } from 'node:path';
import { sealChunk } from '../../src/core/chunks/blob.js';
import { wrapLineageKeys, type LineageKeys } from '../../src/core/keys.js';
import { createManifest, encodeManifest, manifestDigest, type Manifest } from '../../src/core/chunks/manifest.js';
import { FsChunkStore } from '../../src/store/fs-chunk-store.js';

/** A store holding one manifest of `n` random chunks (64 KiB), for transfer tests. */
export async function makeDesktopStore(dir: string, keys: LineageKeys, n: number): Promise<{ store: FsChunkStore; manifest: Manifest; digest: string }> {
  const store = await FsChunkStore.open(join(dir, 'server-store'));
  const chunkSize = 64 * 1024;
  const ids = [];
  for (let i = 0; i < n; i++) {
    const sealed = sealChunk(keys, randomBytes(chunkSize));
    await store.put(sealed.id, sealed.blob, { defer: true });
    ids.push(sealed.id);
  }
  await store.sync();
  const manifest = createManifest(chunkSize, n * chunkSize, ids);
  const digest = manifestDigest(manifest);
  await store.putManifest(digest, encodeManifest(manifest));
  return { store, manifest, digest };
}

export function wrapped(master: Buffer, keys: LineageKeys): { wrappedKeys: string; keyContext: string } {
  return { wrappedKeys: wrapLineageKeys(master, keys, 'lineage:test').toString('base64'), keyContext: 'lineage:test' };
}
