/**
 * What the pack repository (../pack-repository.ts) stores in: two flat namespaces of named
 * objects, packs and manifests. A backend knows how to read a byte range, write, list and delete
 * them on its medium and nothing about blobs, the index or group commit (restic's `backend` under
 * its `repository`). Implementations: a directory (dir-backend.ts) and an S3 bucket (s3-backend.ts).
 *
 * Objects are named uniquely (packs) or by their content (manifests), so writing a name that
 * exists writes the same bytes again: a backend may keep the stored object and only mark it used.
 */
export type ObjectKind = 'packs' | 'manifests';

export interface ObjectInfo {
  name: string;
  bytes: number;
  /** Last modification (ms): garbage collection's grace for manifests. */
  modifiedAt: number;
}

/**
 * A pack being written. The repository reserves each record's offset and calls `write` in offset
 * order, several at once; `flush` makes everything written so far durable (and may be called
 * again after it failed). A file takes more writes after a flush; an object is written whole at
 * its first flush (see `Backend.appendAfterFlush`).
 */
export interface PackSink {
  write(bytes: Buffer, offset: number): Promise<void>;
  flush(): Promise<void>;
  /** Bytes written here, durable or not yet; null when the pack is gone. */
  read(offset: number, length: number): Promise<Buffer | null>;
}

export interface Backend {
  /** For messages: "directory /srv/chunks", "S3 bucket chunks". */
  readonly label: string;
  /** A flushed pack takes more writes (a file: fdatasync per group commit) or not (an object). */
  readonly appendAfterFlush: boolean;
  /** Reads of neighbouring records share one request when at most `gap` bytes apart, up to `max` bytes. */
  readonly mergeReads: { gap: number; max: number };
  /** A new, empty pack (its name is not taken yet). */
  createPack(name: string): Promise<PackSink>;
  /** `length` bytes at `offset` (fewer past the end), or the whole object without them; null when absent. */
  read(kind: ObjectKind, name: string, offset?: number, length?: number): Promise<Buffer | null>;
  /** Writes a whole object durably. */
  write(kind: ObjectKind, name: string, data: Uint8Array): Promise<void>;
  list(kind: ObjectKind): AsyncIterable<ObjectInfo>;
  /** Deletes an object; one already gone is no error. */
  delete(kind: ObjectKind, name: string): Promise<void>;
  close(): Promise<void>;
}

/**
 * A pack held in memory and written whole at its first flush (an object store cannot append).
 * After that write the memory is released and reads go to the stored object.
 */
export class BufferedPackSink implements PackSink {
  private parts: Buffer[] = [];
  private size = 0;
  private flushing: Promise<void> | null = null;
  private written = false;

  constructor(
    private readonly backend: Backend,
    private readonly name: string,
  ) {}

  async write(bytes: Buffer, offset: number): Promise<void> {
    if (this.flushing || offset !== this.size) throw new Error(`pack ${this.name}: write at ${offset} after ${this.size} bytes${this.flushing ? ' and its flush' : ''}`);
    this.parts.push(bytes);
    this.size += bytes.length;
  }

  flush(): Promise<void> {
    this.flushing ??= (async () => {
      // One copy in memory while it goes out: unpublished reads are served from the body.
      const body = this.parts.length === 1 ? this.parts[0]! : Buffer.concat(this.parts, this.size);
      this.parts = [body];
      await this.backend.write('packs', this.name, body);
      this.written = true;
      this.parts = [];
    })().catch((err: unknown) => {
      this.flushing = null; // the next flush tries again
      throw err;
    });
    return this.flushing;
  }

  async read(offset: number, length: number): Promise<Buffer | null> {
    if (this.written) return this.backend.read('packs', this.name, offset, length);
    const out = Buffer.alloc(Math.max(0, Math.min(length, this.size - offset)));
    let at = 0;
    for (const part of this.parts) {
      const from = Math.max(offset, at);
      const to = Math.min(offset + out.length, at + part.length);
      if (from < to) part.copy(out, from - offset, from - at, to - at);
      at += part.length;
    }
    return out;
  }
}
