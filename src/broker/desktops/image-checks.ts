import { stat } from 'node:fs/promises';
import { isAbsolute } from 'node:path';
import { inspectImage } from '../../import/source.js';
import { HttpError } from '../http.js';

export const SECTOR = 512;
export const DEFAULT_CHUNK = 256 * 1024;
const WHERE = 'image paths are read on the broker host, not on your machine; to import a file from your machine, upload it (`carryon admin desktops upload`, or the console\'s "Upload from this computer")';

/** Refuses sizes no disk has: smaller than one chunk, or not a whole number of 512-byte sectors. */
export function checkImageSize(sizeBytes: number, chunkSize = DEFAULT_CHUNK, what = 'image'): void {
  if (sizeBytes < chunkSize) {
    throw new HttpError(400, 'image-too-small', `${what} is ${sizeBytes} bytes, smaller than one chunk (${chunkSize} bytes): that is not a disk image`);
  }
  if (sizeBytes % SECTOR !== 0) {
    throw new HttpError(400, 'not-whole-sectors', `${what} is ${sizeBytes} bytes, not a whole number of ${SECTOR}-byte sectors: is it a disk image, and was it copied completely?`);
  }
}

/** Everything that can be said about an image before importing it: where, readable, sane size. */
export async function inspectForImport(image: string, chunkSize?: number): Promise<number> {
  if (!isAbsolute(image)) throw new HttpError(400, 'relative-path', `${image} is a relative path; ${WHERE}`);
  let size: number;
  try {
    const info = await inspectImage(image);
    // QEMU rounds a raw file's size up to whole sectors; the file itself says what was copied.
    const st = await stat(image);
    size = info.format === 'raw' && st.isFile() ? st.size : info.virtualSize;
  } catch (err) {
    const code = (err as { code?: string }).code ?? 'bad-image';
    const hint = code === 'not-found' ? ` (${WHERE})` : '';
    throw new HttpError(code === 'not-found' ? 404 : 400, code, `${(err as Error).message}${hint}`);
  }
  checkImageSize(size, chunkSize, `image ${image}`);
  return size;
}
