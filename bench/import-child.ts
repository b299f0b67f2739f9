// Child process for the memory figure: imports one image into a fresh pack store and reports its
// own peak RSS (main thread and sealing workers together), so nothing else in the bench counts.
import { generateLineageKeys } from '../src/core/keys.js';
import { importImage } from '../src/import/import.js';
import { PackChunkStore } from '../src/store/pack-chunk-store.js';

const [image, storeDir] = process.argv.slice(2);
if (!image || !storeDir) throw new Error('usage: import-child <image> <store-dir>');
const store = await PackChunkStore.open(storeDir);
const t = process.hrtime.bigint();
const res = await importImage(image, { store, keys: generateLineageKeys() });
const seconds = Number(process.hrtime.bigint() - t) / 1e9;
await store.close();
process.stdout.write(`${JSON.stringify({ seconds, bytesRead: res.bytesRead, maxRssBytes: process.resourceUsage().maxRSS * 1024 })}\n`);
