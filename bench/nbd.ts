import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdir, open, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { generateLineageKeys } from '../src/core/keys.js';
import { VaultDisk } from '../src/disk/vault-disk.js';
import { importImage } from '../src/import/import.js';
import { serveNbd } from '../src/nbd/server.js';
import { PackChunkStore } from '../src/store/pack-chunk-store.js';
import { MB, repeat, run, settle, timed } from './lib/measure.js';
import type { BenchRow, BenchSection } from './types.js';

async function randomFile(path: string, bytes: number): Promise<void> {
  const fh = await open(path, 'w');
  for (let off = 0; off < bytes; off += 1 << 20) await fh.write(randomBytes(1 << 20), 0, 1 << 20, off);
  await fh.close();
}

async function waitFor(path: string): Promise<void> {
  const { stat } = await import('node:fs/promises');
  for (let i = 0; i < 200; i++) {
    try {
      await stat(path);
      return;
    } catch {
      await new Promise((r) => setTimeout(r, 50));
    }
  }
  throw new Error(`${path} never appeared`);
}

/** Sequential read/write through our NBD server (vault disk) vs qemu-nbd on a raw file, by nbdcopy. */
export function nbdSection(work: string, sizeGiB: number): BenchSection {
  return {
    name: `NBD throughput, ${sizeGiB} GiB, measured with nbdcopy`,
    async run() {
      const bytes = sizeGiB * 2 ** 30;
      const dir = join(work, 'nbd');
      await mkdir(dir, { recursive: true });
      const raw = join(dir, 'disk.raw');
      await randomFile(raw, bytes);
      const store = await PackChunkStore.open(join(dir, 'store'));
      const keys = generateLineageKeys();
      const { manifest } = await importImage(raw, { store, keys });
      const disk = await VaultDisk.open({ stateDir: join(dir, 'state'), store, keys, base: manifest, autoFlushMs: 0 });
      const sock = join(dir, 'ours', 'nbd.sock');
      const server = await serveNbd(new Map([['disk0', disk]]), { socketPath: sock });
      const ours = `nbd+unix:///disk0?socket=${sock}`;
      const qsock = join(dir, 'qemu.sock');
      const qemu = spawn('qemu-nbd', ['-f', 'raw', '-t', '-e', '8', '-x', 'disk0', '-k', qsock, raw], { stdio: 'ignore' });
      const theirs = `nbd+unix:///disk0?socket=${qsock}`;
      const rows: BenchRow[] = [];
      try {
        await waitFor(qsock);
        await settle();
        const read = async (uri: string) => repeat(3, async () => bytes / (await timed(() => run('nbdcopy', [uri, 'null:']))).seconds / MB, { warmup: 1 });
        const r1 = await read(ours);
        const r2 = await read(theirs);
        rows.push({ section: 'nbd', name: 'sequential read (decrypt + authenticate + decompress per chunk)', value: r1.median, unit: 'MB/s', runs: r1.runs, spread: r1.spread, peer: { name: 'qemu-nbd serving a plain raw file', value: r2.median, unit: 'MB/s' }, note: `${((100 * r1.median) / r2.median).toFixed(0)}% of qemu-nbd (goal ≥ 50%)` });
        const src = join(dir, 'src.raw');
        await randomFile(src, bytes);
        const write = async (uri: string) => repeat(3, async () => bytes / (await timed(() => run('nbdcopy', ['--flush', src, uri]))).seconds / MB);
        const w1 = await write(ours);
        const w2 = await write(theirs);
        rows.push({ section: 'nbd', name: 'sequential write (seal into new blobs, flush)', value: w1.median, unit: 'MB/s', runs: w1.runs, spread: w1.spread, peer: { name: 'qemu-nbd serving a plain raw file', value: w2.median, unit: 'MB/s' }, note: `${((100 * w1.median) / w2.median).toFixed(0)}% of qemu-nbd` });
      } finally {
        qemu.kill('SIGTERM');
        await server.close();
        await disk.close();
        await store.close();
        await rm(dir, { recursive: true, force: true });
      }
      return rows;
    },
  };
}
