import { realpath } from 'node:fs/promises';
import { isAbsolute, resolve, sep } from 'node:path';
import type { BrokerContext } from '../context.js';
import { HttpError } from '../http.js';

const inside = (dirs: string[], path: string) => dirs.some((d) => path === d || path.startsWith(d.endsWith(sep) ? d : d + sep));

/**
 * An image path given to the admin API is read on the broker host, so it must lie inside one of
 * the directories the broker was started with (`carryon server --import-dir`): an API call must
 * not read arbitrary files of the broker host (`/etc/shadow`) into a desktop a user can then
 * check out. Both the path as written and its real path (symlinks followed) must be inside. A
 * relative path or a missing file is passed on for the image checks to refuse with their message.
 * Uploads (`/v1/admin/uploads`) do not come through here.
 */
export async function resolveImportPath(ctx: BrokerContext, image: string): Promise<string> {
  const dirs = ctx.settings.importDirs;
  if (dirs.length === 0) {
    throw new HttpError(403, 'import-path-refused', 'this broker imports images by path only from configured directories, and none is configured: start it with --import-dir <dir> (config file: "importDirs"), or upload the image (`carryon admin desktops upload`)');
  }
  if (!isAbsolute(image)) return image;
  const written = resolve(image);
  const refuse = () => new HttpError(403, 'import-path-refused', `${image} is outside the import directories (${dirs.join(', ')})`);
  if (!inside(dirs, written)) throw refuse();
  let real: string;
  try {
    real = await realpath(written);
  } catch {
    return written;
  }
  if (!inside(dirs, real)) throw refuse();
  return real;
}
