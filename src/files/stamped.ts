import { stat } from 'node:fs/promises';

/** What says a file was not written: its size, times and inode. */
export interface FileStamp {
  size: number;
  mtimeMs: number;
  ctimeMs: number;
  ino: number;
}

export async function fileStamp(path: string): Promise<FileStamp> {
  const s = await stat(path);
  return { size: s.size, mtimeMs: s.mtimeMs, ctimeMs: s.ctimeMs, ino: s.ino };
}

export const sameStamp = (a: FileStamp | null | undefined, b: FileStamp) => !!a && a.size === b.size && a.mtimeMs === b.mtimeMs && a.ctimeMs === b.ctimeMs && a.ino === b.ino;

type Reading = (path: string) => Promise<unknown>;

/**
 * Values read from files ahead of the moment they are used (a check-in reads its layers' shapes
 * and maps while the broker checks the password), each handed out only while its file's stamp is
 * what it was before the read began: a file written since is read again. The stamp is taken
 * first, so a write during the read also shows.
 */
export class ReadAhead {
  private readonly values = new Map<string, Promise<{ stamp: FileStamp; value: unknown }>>();

  /** Starts `read(path)`; its errors surface only where the value is asked for (then it is read again). */
  start(read: Reading, path: string): void {
    const key = this.key(read, path);
    if (this.values.has(key)) return;
    const p = (async () => {
      const stamp = await fileStamp(path);
      return { stamp, value: await read(path) };
    })();
    p.catch(() => undefined);
    this.values.set(key, p);
  }

  /** `read(path)` as started ahead if the file is unchanged since, else read now. */
  async get<T>(read: (path: string) => Promise<T>, path: string): Promise<T> {
    const key = this.key(read, path);
    const ahead = this.values.get(key);
    this.values.delete(key);
    const got = ahead ? await ahead.catch(() => null) : null;
    if (got && sameStamp(got.stamp, await fileStamp(path).catch(() => ({ size: -1, mtimeMs: 0, ctimeMs: 0, ino: 0 })))) return got.value as T;
    return read(path);
  }

  private readonly names = new Map<Reading, number>();
  private key(read: Reading, path: string): string {
    let n = this.names.get(read);
    if (n === undefined) this.names.set(read, (n = this.names.size));
    return `${n}\0${path}`;
  }
}
