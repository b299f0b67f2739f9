import { randomBytes } from 'node:crypto';
import { mkdir, open, readdir, readFile, rename, rm, stat, utimes, type FileHandle } from 'node:fs/promises';
import { join } from 'node:path';
import { CarryonError } from '../../core/errors.js';
import { exists, syncPath, writeWhole } from '../../files/atomic.js';
import type { Backend, ObjectInfo, ObjectKind, PackSink } from './backend.js';

/** Names this backend turns into paths: no separators, no dot files, nothing to climb out with. */
const SAFE_NAME = /^[0-9A-Za-z_-][0-9A-Za-z._-]*$/;


function gone(err: unknown): boolean {
  // EBADF: a pack deleted (its handle closed) while a read was on its way.
  const code = (err as NodeJS.ErrnoException).code;
  return code === 'ENOENT' || code === 'EBADF';
}

/**
 * Packs and manifests as files under `root` (packs/, manifests/, tmp/). A pack is a file that
 * takes appends across group commits: a commit costs one fdatasync per pack, not a file per blob.
 * Manifests are written whole: temp file, fsync, rename, directory fsync.
 */
export class DirBackend implements Backend {
  readonly appendAfterFlush = true;
  /** A local disk: only touching records are worth one read. */
  readonly mergeReads = { gap: 0, max: 1024 * 1024 };
  /** One open handle per pack read or written, kept for the store's life (packs are few, ≤ 1 GiB each). */
  private readonly handles = new Map<string, Promise<FileHandle>>();

  constructor(readonly root: string) {}

  /** Creates the folders of `kinds`; leftover temp files are writes that never committed: discarded. */
  static async open(root: string, kinds: ObjectKind[] = ['packs', 'manifests']): Promise<DirBackend> {
    for (const kind of kinds) await mkdir(join(root, kind), { recursive: true });
    await rm(join(root, 'tmp'), { recursive: true, force: true });
    await mkdir(join(root, 'tmp'), { recursive: true });
    return new DirBackend(root);
  }

  get label(): string {
    return `directory ${this.root}`;
  }

  private path(kind: ObjectKind, name: string): string {
    if (!SAFE_NAME.test(name)) throw new CarryonError('store-corrupt', `not a stored object name: ${name.slice(0, 80)}`);
    return join(this.root, kind, name);
  }

  async createPack(name: string): Promise<PackSink> {
    const path = this.path('packs', name);
    const fh = await open(path, 'wx+', 0o600);
    await syncPath(join(this.root, 'packs'));
    this.handles.set(path, Promise.resolve(fh));
    return new FilePackSink(fh, (offset, length) => this.read('packs', name, offset, length));
  }

  async read(kind: ObjectKind, name: string, offset?: number, length?: number): Promise<Buffer | null> {
    const path = this.path(kind, name);
    try {
      if (offset === undefined || length === undefined) return await readFile(path);
      const fh = await this.handle(path);
      const buf = Buffer.allocUnsafe(length);
      const { bytesRead } = await fh.read(buf, 0, length, offset);
      return buf.subarray(0, bytesRead);
    } catch (err) {
      if (gone(err)) return null;
      throw err;
    }
  }

  private handle(path: string): Promise<FileHandle> {
    let p = this.handles.get(path);
    if (!p) {
      p = open(path, 'r');
      this.handles.set(path, p);
      p.catch(() => this.handles.delete(path));
    }
    return p;
  }

  async write(kind: ObjectKind, name: string, data: Uint8Array): Promise<void> {
    const path = this.path(kind, name);
    if (await exists(path)) {
      // Same name, same bytes (see backend.ts): written again means used now, as GC sees it.
      const now = new Date();
      await utimes(path, now, now).catch(() => undefined);
      return;
    }
    const tmp = join(this.root, 'tmp', `${name}.${randomBytes(6).toString('hex')}`);
    await writeWhole(tmp, data, true);
    await rename(tmp, path);
    await syncPath(join(this.root, kind));
  }

  async *list(kind: ObjectKind): AsyncIterable<ObjectInfo> {
    for (const name of (await readdir(join(this.root, kind))).sort()) {
      if (!SAFE_NAME.test(name)) continue;
      const st = await stat(join(this.root, kind, name)).catch(() => null);
      if (st?.isFile()) yield { name, bytes: st.size, modifiedAt: st.mtimeMs };
    }
  }

  async delete(kind: ObjectKind, name: string): Promise<void> {
    const path = this.path(kind, name);
    const handle = this.handles.get(path);
    this.handles.delete(path);
    await (await handle?.catch(() => null))?.close();
    await rm(path, { force: true });
  }

  async close(): Promise<void> {
    const handles = await Promise.all([...this.handles.values()].map((p) => p.catch(() => null)));
    this.handles.clear();
    await Promise.all(handles.map((h) => h?.close()));
  }
}

/** A pack file: writes land in the page cache at once; a flush is one fdatasync after them. */
class FilePackSink implements PackSink {
  private readonly writing = new Set<Promise<void>>();

  constructor(
    private readonly fh: FileHandle,
    readonly read: (offset: number, length: number) => Promise<Buffer | null>,
  ) {}

  write(bytes: Buffer, offset: number): Promise<void> {
    const p = this.fh.write(bytes, 0, bytes.length, offset).then(() => undefined);
    const tracked = p.finally(() => this.writing.delete(tracked)).catch(() => undefined);
    this.writing.add(tracked);
    return p;
  }

  async flush(): Promise<void> {
    await Promise.all(this.writing);
    await this.fh.datasync();
  }
}
