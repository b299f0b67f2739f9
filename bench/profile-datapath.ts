import { readFileSync } from 'node:fs';
import { mkdir, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { openBlob, sealChunk } from '../src/core/chunks/blob.js';
import { DEFAULT_CHUNK_SIZE } from '../src/core/chunks/chunking.js';
import { generateLineageKeys } from '../src/core/keys.js';
import { WriteWindow } from '../src/core/write-window.js';
import { createLayerFromTemplate } from '../src/disk/layer-template.js';
import { Qcow2BaseWriter } from '../src/disk/qcow2/qcow2-base-writer.js';
import { writeTestImage } from '../src/demo/image.js';

/**
 * The laptop's per-byte check-out path without the network (issue 25): the bench's mixed image
 * sealed into blobs in memory, then each opened (GCM, zstd) into the base writer's spare buffer and
 * written (XTS on the writer threads, O_DIRECT), several writes in flight, as fill-direct does.
 * Prints the CPU seconds (all threads) of each pass.
 *
 *   node --max-semi-space-size=32 --heap-growing-percent=200 dist/bench/profile-datapath.js [GiB] [passes]
 */
const sizeGiB = Number(process.argv[2] ?? 0.5);
const passes = Number(process.argv[3] ?? 3);
const dir = process.env.PROFILE_DIR ?? '/var/tmp/carryon-profile';
const chunk = DEFAULT_CHUNK_SIZE;

await mkdir(dir, { recursive: true });
const image = join(dir, `datapath-${sizeGiB}.raw`);
const size = sizeGiB * 2 ** 30;
await writeTestImage(image, size, 'mixed');
const keys = generateLineageKeys();
const raw = readFileSync(image);
const zero = Buffer.alloc(chunk);
const blobs: { id: ReturnType<typeof sealChunk>['id']; blob: Buffer; index: number }[] = [];
for (let i = 0; i * chunk < size; i++) {
  const plain = raw.subarray(i * chunk, (i + 1) * chunk);
  if (plain.equals(zero)) continue;
  const { id, blob } = sealChunk(keys, plain);
  blobs.push({ id, blob, index: i });
}
const pass = 'profile-datapath-pass';
const base = join(dir, 'datapath-base.qcow2');
for (let p = 0; p < passes; p++) {
  await rm(base, { force: true });
  await createLayerFromTemplate(join(dir, 'templates'), { kind: 'base', clusterSize: chunk }, base, size, pass);
  const writer = await Qcow2BaseWriter.open(base, pass, chunk);
  const c0 = process.cpuUsage();
  const t0 = performance.now();
  const writes = new WriteWindow(8);
  for (const { id, blob, index } of blobs) {
    // As fetchBlobs hands them over: a copy of the frame in a buffer of the decoder's own.
    const plain = openBlob(keys, id, Buffer.from(blob), { checkId: false, into: writer.spare() ?? undefined });
    await writes.add(writer.write(index, plain));
  }
  await writes.drain();
  await writer.persist();
  const c = process.cpuUsage(c0);
  const secs = (c.user + c.system) / 1e6;
  console.log(`pass ${p}: ${blobs.length} chunks, ${((performance.now() - t0) / 1000).toFixed(2)} s wall, ${secs.toFixed(2)} CPU s (${(secs / sizeGiB).toFixed(2)} per GiB of image)`);
  await writer.close();
}
await rm(base, { force: true });
