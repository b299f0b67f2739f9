import { randomBytes } from 'node:crypto';
import { open } from 'node:fs/promises';

/**
 * Writes a test disk image without holding it in memory. 'mixed' is what desktops look like:
 * per 1 MiB, half zeros (free space), a quarter text-like compressible data, a quarter random.
 */
export async function writeTestImage(path: string, bytes: number, kind: 'random' | 'mixed'): Promise<void> {
  const fh = await open(path, 'w');
  try {
    await fh.truncate(bytes);
    const block = 1024 * 1024;
    const words = Buffer.from('the quick brown fox jumps over the lazy desktop while the laptop is offline; ');
    for (let off = 0; off < bytes; off += block) {
      const n = Math.min(block, bytes - off);
      if (kind === 'random') {
        await fh.write(randomBytes(n), 0, n, off);
        continue;
      }
      const q = Math.floor(n / 4);
      const text = Buffer.alloc(q);
      for (let i = 0; i < q; i += words.length) words.copy(text, i, 0, Math.min(words.length, q - i));
      text.writeUInt32LE(off / block, 0);
      await fh.write(text, 0, q, off);
      await fh.write(randomBytes(q), 0, q, off + q);
      // The second half stays zero (sparse).
    }
  } finally {
    await fh.close();
  }
}
