import { constants as fsConstants } from 'node:fs';
import { mkdir, open } from 'node:fs/promises';
import { CarryonError } from '../core/errors.js';

/**
 * Makes `dir` a directory only this user can enter (0700), for unix sockets: a socket created
 * inside it is unreachable by others from the moment `listen` makes it, whatever the umask (a
 * chmod after `listen` left a window). An existing directory is tightened; one that is a
 * symlink, not a directory, or owned by someone else is refused (whoever owns it could swap the
 * socket). Checked and tightened through one descriptor opened without following links.
 */
export async function ensurePrivateDir(dir: string): Promise<void> {
  await mkdir(dir, { recursive: true, mode: 0o700 });
  let fh;
  try {
    fh = await open(dir, fsConstants.O_RDONLY | fsConstants.O_DIRECTORY | fsConstants.O_NOFOLLOW);
  } catch (err) {
    throw new CarryonError('unsafe-socket-dir', `${dir} is not a directory of its own (${(err as NodeJS.ErrnoException).code}): remove it and try again`);
  }
  try {
    const st = await fh.stat();
    const uid = process.getuid?.() ?? st.uid;
    if (st.uid !== uid) throw new CarryonError('unsafe-socket-dir', `${dir} belongs to user ${st.uid}, not this user (${uid}): remove it and try again`);
    if ((st.mode & 0o777) !== 0o700) await fh.chmod(0o700);
  } finally {
    await fh.close();
  }
}
