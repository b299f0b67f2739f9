import { randomBytes } from 'node:crypto';
import { join } from 'node:path';
import type { S3Client } from '@aws-sdk/client-s3';
import { chunkIdFromBytes, chunkIdToBytes, parseChunkId, type ChunkId } from '../core/chunk-id.js';
import { CarryonError, ValidationError } from '../core/errors.js';
import type { CollectableStore, PackInfo } from './chunk-store.js';
import { isPostgresUrl, PgPackIndex } from './pg-pack-index.js';
import { type BlobUse, packCreatedAt, packWriterPid, RECORD_HEAD, SqlitePackIndex, type Location, type PackIndex } from './pack-index.js';
import type { S3StoreConfig } from './s3-config.js';

type Sdk = typeof import('@aws-sdk/client-s3');

const DIGEST_RE = /^[0-9a-f]{64}$/;
/** Packs being uploaded at once before `put` waits (memory: about this many × packBytes). */
const MAX_UPLOADS = 3;
const PART_CONCURRENCY = 4;
/** getMany: neighbours at most this far apart share one ranged GET, up to MERGE_MAX bytes. */
const MERGE_GAP = 512 * 1024;
const MERGE_MAX = 16 * 1024 * 1024;
const GET_CONCURRENCY = 8;

interface Entry {
  id: ChunkId;
  offset: number;
  length: number;
  /** Compaction: the blob is already published at `from` and moves here. */
  from?: Location;
}

/** A pack being filled in memory, then uploaded as one object. */
interface OpenPack {
  name: string;
  createdAt: number;
  parts: Buffer[];
  size: number;
  entries: Entry[];
  upload: Promise<void> | null;
  /** The object is durable (its blobs await only the index commit). */
  uploaded: boolean;
}

/**
 * A blob written here and not yet published: its record in memory until its pack is uploaded,
 * then (memory released) read back from the uploaded object.
 */
interface Pending {
  pack: OpenPack;
  entry: Entry;
  record: Buffer | null;
}

export interface S3StoreOptions {
  touchSlackMs?: number;
  /** Another process's pack younger than twice this may not be indexed yet: GC leaves it alone. */
  packMaxAgeMs?: number;
  /** A ready index (tests, or a shared database); else SQLite at config.indexPath. */
  index?: PackIndex;
}

function isNotFound(err: unknown): boolean {
  const e = err as { name?: string; $metadata?: { httpStatusCode?: number } };
  return e?.name === 'NoSuchKey' || e?.name === 'NotFound' || e?.$metadata?.httpStatusCode === 404;
}

/**
 * Chunk store on an S3-compatible object store: blobs are appended to packs in memory; a pack is
 * uploaded as one object (multipart past one part) when full or at `sync()`; a single blob is
 * read back with a ranged GET. Group commit as in the local pack store: a blob is published by
 * the index commit, which happens only after its pack object is durable (the PUT or the multipart
 * completion succeeded). A crash leaves at most an unindexed pack object (dead space, never wrong
 * data), which garbage collection deletes later. Nothing relies on conditional PUTs: pack names
 * are unique per writer, manifests are named by their content.
 *
 * Retries: every request is retried by the SDK (standard mode: exponential backoff with jitter,
 * `maxAttempts`); a pack whose upload still fails stays pending and is uploaded again at the
 * next `sync()`.
 */
export class S3ChunkStore implements CollectableStore {
  private readonly pending = new Map<ChunkId, Pending>();
  private current: OpenPack | null = null;
  /** Sealed packs (uploading or uploaded) whose blobs are not published yet. */
  private sealed: OpenPack[] = [];
  private lastSync: Promise<void> = Promise.resolve();
  readonly touchSlackMs: number;
  private readonly packMaxAgeMs: number;

  private constructor(
    private readonly sdk: Sdk,
    private readonly s3: S3Client,
    readonly config: S3StoreConfig,
    private readonly index: PackIndex,
    opts: S3StoreOptions,
  ) {
    this.touchSlackMs = opts.touchSlackMs ?? 10 * 60_000;
    this.packMaxAgeMs = opts.packMaxAgeMs ?? 3600_000;
  }

  static async open(config: S3StoreConfig, opts: S3StoreOptions = {}): Promise<S3ChunkStore> {
    // The SDK's notice about future Node versions is for us, not for whoever runs `carryon`.
    process.env.AWS_SDK_JS_NODE_VERSION_SUPPORT_WARNING_DISABLED ??= 'true';
    const sdk = await import('@aws-sdk/client-s3');
    const s3 = new sdk.S3Client({
      endpoint: config.endpoint,
      region: config.region ?? process.env.AWS_REGION ?? process.env.AWS_DEFAULT_REGION ?? 'us-east-1',
      forcePathStyle: config.forcePathStyle,
      credentials: config.credentials,
      maxAttempts: config.maxAttempts,
      retryMode: 'standard',
      // Streamed bodies with checksum trailers are not understood by every S3 implementation.
      requestChecksumCalculation: 'WHEN_REQUIRED',
      responseChecksumValidation: 'WHEN_REQUIRED',
    });
    try {
      await s3.send(new sdk.HeadBucketCommand({ Bucket: config.bucket }));
    } catch (err) {
      if (!isNotFound(err) || !config.createBucket) {
        s3.destroy();
        throw new CarryonError('store-unavailable', `S3 bucket ${config.bucket} at ${config.endpoint ?? 'AWS'}: ${isNotFound(err) ? 'does not exist (add create=true to the URL to create it)' : (err as Error).message}`);
      }
      await s3.send(new sdk.CreateBucketCommand({ Bucket: config.bucket }));
    }
    if (!opts.index && !config.indexPath) throw new CarryonError('bad-config', 'an S3 chunk store needs a pack index: add index=/path/to/index.sqlite (or index=postgres://…, URL-encoded) to the URL');
    // A PostgreSQL index is shared by every broker and transfer server writing the bucket.
    const index = opts.index ?? (isPostgresUrl(config.indexPath!) ? await PgPackIndex.open(config.indexPath!) : SqlitePackIndex.open(config.indexPath!));
    return new S3ChunkStore(sdk, s3, config, index, opts);
  }

  private key(kind: 'packs' | 'manifests', name: string): string {
    return `${this.config.prefix}${kind}/${name}`;
  }

  async has(id: ChunkId): Promise<boolean> {
    parseChunkId(id);
    return this.pending.has(id) || (await this.index.get(id)) !== null;
  }

  async get(id: ChunkId): Promise<Buffer | null> {
    parseChunkId(id);
    const p = this.pending.get(id);
    if (p?.record) return Buffer.from(p.record.subarray(RECORD_HEAD));
    if (p) return this.readRecord(id, this.where(p));
    for (let attempt = 0; ; attempt++) {
      const loc = await this.index.get(id);
      if (!loc) return null;
      try {
        return await this.readRecord(id, loc);
      } catch (err) {
        // Compaction moved the blob and deleted its old pack between the lookup and the read.
        if (isNotFound(err) && attempt === 0) continue;
        throw err;
      }
    }
  }

  /**
   * Blobs in input order. Records close to each other in one pack (a check-out asks for chunks
   * in disk order, which is how an import wrote them) come back in one ranged GET.
   */
  async getMany(ids: readonly ChunkId[]): Promise<(Buffer | null)[]> {
    const out = new Array<Buffer | null>(ids.length).fill(null);
    const wanted: { i: number; id: ChunkId; loc: Location }[] = [];
    for (const [i, id] of ids.entries()) {
      parseChunkId(id);
      const p = this.pending.get(id);
      if (p?.record) out[i] = Buffer.from(p.record.subarray(RECORD_HEAD));
      else {
        const loc = p ? this.where(p) : await this.index.get(id);
        if (loc) wanted.push({ i, id, loc });
      }
    }
    wanted.sort((a, b) => (a.loc.pack < b.loc.pack ? -1 : a.loc.pack > b.loc.pack ? 1 : a.loc.offset - b.loc.offset));
    const ranges: { pack: string; start: number; end: number; items: typeof wanted }[] = [];
    for (const w of wanted) {
      const end = w.loc.offset + RECORD_HEAD + w.loc.length;
      const last = ranges[ranges.length - 1];
      if (last && last.pack === w.loc.pack && w.loc.offset - last.end <= MERGE_GAP && end - last.start <= MERGE_MAX) {
        last.end = Math.max(last.end, end);
        last.items.push(w);
      } else ranges.push({ pack: w.loc.pack, start: w.loc.offset, end, items: [w] });
    }
    let next = 0;
    await Promise.all(Array.from({ length: Math.min(GET_CONCURRENCY, ranges.length) }, async () => {
      while (next < ranges.length) {
        const r = ranges[next++]!;
        let buf: Buffer;
        try {
          const res = await this.s3.send(new this.sdk.GetObjectCommand({ Bucket: this.config.bucket, Key: this.key('packs', r.pack), Range: `bytes=${r.start}-${r.end - 1}` }));
          buf = Buffer.from(await res.Body!.transformToByteArray());
        } catch (err) {
          if (!isNotFound(err)) throw err;
          // Compacted away meanwhile: look each one up again.
          for (const w of r.items) out[w.i] = await this.get(w.id);
          continue;
        }
        for (const w of r.items) {
          const rec = buf.subarray(w.loc.offset - r.start, w.loc.offset - r.start + RECORD_HEAD + w.loc.length);
          if (rec.length !== RECORD_HEAD + w.loc.length || rec.readUInt32BE(32) !== w.loc.length || chunkIdFromBytes(rec.subarray(0, 32)) !== w.id) {
            throw new CarryonError('store-corrupt', `pack ${w.loc.pack} does not hold chunk ${w.id} at ${w.loc.offset} as its index says`);
          }
          out[w.i] = rec.subarray(RECORD_HEAD);
        }
      }
    }));
    return out;
  }

  private where(p: Pending): Location {
    return { pack: p.pack.name, offset: p.entry.offset, length: p.entry.length };
  }

  private async readRecord(id: ChunkId, loc: Location): Promise<Buffer> {
    const res = await this.s3.send(new this.sdk.GetObjectCommand({
      Bucket: this.config.bucket, Key: this.key('packs', loc.pack), Range: `bytes=${loc.offset}-${loc.offset + RECORD_HEAD + loc.length - 1}`,
    }));
    const buf = Buffer.from(await res.Body!.transformToByteArray());
    if (buf.length !== RECORD_HEAD + loc.length || buf.readUInt32BE(32) !== loc.length || chunkIdFromBytes(buf.subarray(0, 32)) !== id) {
      throw new CarryonError('store-corrupt', `pack ${loc.pack} does not hold chunk ${id} at ${loc.offset} as its index says`);
    }
    return buf.subarray(RECORD_HEAD);
  }

  async put(id: ChunkId, blob: Uint8Array, opts: { defer?: boolean } = {}): Promise<boolean> {
    if (await this.has(id)) {
      await this.touch([id]);
      return false;
    }
    const record = Buffer.allocUnsafe(RECORD_HEAD + blob.length);
    chunkIdToBytes(id).copy(record, 0);
    record.writeUInt32BE(blob.length, 32);
    Buffer.from(blob.buffer, blob.byteOffset, blob.byteLength).copy(record, RECORD_HEAD);
    const { pack, entry } = this.append(record, { id, length: blob.length });
    this.pending.set(id, { pack, entry, record });
    await this.backpressure();
    if (!opts.defer) await this.sync();
    return true;
  }

  private append(record: Buffer, e: Omit<Entry, 'offset'>): { pack: OpenPack; entry: Entry } {
    if (!this.current) {
      const createdAt = Date.now();
      this.current = { name: `${createdAt.toString(36)}-${process.pid}-${randomBytes(4).toString('hex')}.pack`, createdAt, parts: [], size: 0, entries: [], upload: null, uploaded: false };
    }
    const pack = this.current;
    const entry: Entry = { ...e, offset: pack.size };
    pack.parts.push(record);
    pack.size += record.length;
    pack.entries.push(entry);
    if (pack.size >= this.config.packBytes) this.seal();
    return { pack, entry };
  }

  /** Closes the pack being filled and starts its upload in the background. */
  private seal(): void {
    const pack = this.current;
    if (!pack || pack.size === 0) return;
    this.current = null;
    this.sealed.push(pack);
    this.startUpload(pack);
  }

  private startUpload(pack: OpenPack): void {
    pack.upload = this.upload(pack).then(() => {
      // Durable: release the memory; unpublished blobs are read back from the object.
      pack.uploaded = true;
      pack.parts = [];
      for (const e of pack.entries) {
        const p = this.pending.get(e.id);
        if (p?.pack === pack) p.record = null;
      }
    });
    pack.upload.catch(() => undefined); // reported by the sync that publishes it
  }

  /** `put` waits while more than MAX_UPLOADS packs are on their way (memory stays bounded). */
  private async backpressure(): Promise<void> {
    for (;;) {
      const uploading = this.sealed.filter((p) => p.upload && !p.uploaded);
      if (uploading.length <= MAX_UPLOADS) return;
      await Promise.race(uploading.map((p) => p.upload!.catch(() => undefined)));
      if (this.sealed.filter((p) => p.upload && !p.uploaded).length >= uploading.length) return; // failed ones wait for sync
    }
  }

  private async upload(pack: OpenPack): Promise<void> {
    const body = pack.parts.length === 1 ? pack.parts[0]! : Buffer.concat(pack.parts, pack.size);
    if (pack.parts.length > 1) {
      // One copy in memory: pending blobs now point into the pack's body.
      for (const e of pack.entries) {
        const p = this.pending.get(e.id);
        if (p?.pack === pack && p.record) p.record = body.subarray(e.offset, e.offset + RECORD_HEAD + e.length);
      }
    }
    pack.parts = [body];
    const Bucket = this.config.bucket;
    const Key = this.key('packs', pack.name);
    const part = this.config.partBytes;
    if (body.length <= part) {
      await this.s3.send(new this.sdk.PutObjectCommand({ Bucket, Key, Body: body, ContentLength: body.length }));
      return;
    }
    const { UploadId } = await this.s3.send(new this.sdk.CreateMultipartUploadCommand({ Bucket, Key }));
    try {
      const count = Math.ceil(body.length / part);
      const etags = new Array<string>(count);
      let next = 0;
      await Promise.all(Array.from({ length: Math.min(PART_CONCURRENCY, count) }, async () => {
        while (next < count) {
          const i = next++;
          const slice = body.subarray(i * part, Math.min(body.length, (i + 1) * part));
          const res = await this.s3.send(new this.sdk.UploadPartCommand({ Bucket, Key, UploadId, PartNumber: i + 1, Body: slice, ContentLength: slice.length }));
          etags[i] = res.ETag!;
        }
      }));
      await this.s3.send(new this.sdk.CompleteMultipartUploadCommand({ Bucket, Key, UploadId, MultipartUpload: { Parts: etags.map((ETag, i) => ({ ETag, PartNumber: i + 1 })) } }));
    } catch (err) {
      await this.s3.send(new this.sdk.AbortMultipartUploadCommand({ Bucket, Key, UploadId })).catch(() => undefined);
      throw err;
    }
  }

  /** Uploads what is pending and publishes it; concurrent syncs run one after another. */
  sync(): Promise<void> {
    const run = this.lastSync.catch(() => undefined).then(() => this.syncNow());
    this.lastSync = run;
    return run;
  }

  private async syncNow(): Promise<void> {
    this.seal();
    const batch = this.sealed;
    if (batch.length === 0) return;
    for (const p of batch) if (!p.upload) this.startUpload(p); // failed earlier: try again
    const settled = await Promise.allSettled(batch.map((p) => p.upload!));
    const good = batch.filter((_, i) => settled[i]!.status === 'fulfilled');
    const failed = batch.filter((_, i) => settled[i]!.status === 'rejected');
    for (const p of failed) p.upload = null;
    const now = Date.now();
    const fresh = good.flatMap((p) => p.entries.filter((e) => !e.from).map((e) => ({ id: e.id, pack: p.name, offset: e.offset, length: e.length })));
    const moved = good.flatMap((p) => p.entries.filter((e) => e.from).map((e) => ({ id: e.id, from: e.from!, to: { pack: p.name, offset: e.offset, length: e.length } })));
    await this.index.insert(fresh, now);
    if (moved.length) await this.index.relocate(moved);
    this.sealed = this.sealed.filter((p) => !good.includes(p));
    for (const p of good) {
      for (const e of p.entries) if (this.pending.get(e.id)?.pack === p) this.pending.delete(e.id);
      p.parts = [];
    }
    const err = settled.find((s): s is PromiseRejectedResult => s.status === 'rejected');
    if (err) throw new CarryonError('store-unavailable', `uploading ${failed.length} pack(s) to S3 failed (kept for the next sync): ${(err.reason as Error).message}`);
  }

  async delete(id: ChunkId): Promise<void> {
    parseChunkId(id);
    const p = this.pending.get(id);
    if (p) {
      // Not published yet: its record stays in the pack as dead bytes, never indexed.
      this.pending.delete(id);
      p.pack.entries = p.pack.entries.filter((e) => e !== p.entry);
    }
    await this.index.delete(id);
  }

  async *list(): AsyncIterable<ChunkId> {
    for await (const row of this.index.list()) yield row.id;
    for (const id of this.pending.keys()) yield id;
  }

  async missing(ids: readonly ChunkId[]): Promise<ChunkId[]> {
    const unique = [...new Set(ids)];
    for (const id of unique) parseChunkId(id);
    const present = await this.index.present(unique.filter((id) => !this.pending.has(id)));
    await this.touch([...present]);
    return unique.filter((id) => !this.pending.has(id) && !present.has(id));
  }

  private async touch(ids: readonly ChunkId[]): Promise<void> {
    const now = Date.now();
    await this.index.touch(ids, now, now - this.touchSlackMs);
  }

  async putManifest(digest: string, encoded: Uint8Array): Promise<void> {
    // Named by content: writing it twice writes the same bytes, so no condition is needed.
    await this.s3.send(new this.sdk.PutObjectCommand({ Bucket: this.config.bucket, Key: this.key('manifests', this.digest(digest)), Body: encoded, ContentLength: encoded.length }));
  }

  async getManifest(digest: string): Promise<Buffer | null> {
    try {
      const res = await this.s3.send(new this.sdk.GetObjectCommand({ Bucket: this.config.bucket, Key: this.key('manifests', this.digest(digest)) }));
      return Buffer.from(await res.Body!.transformToByteArray());
    } catch (err) {
      if (isNotFound(err)) return null;
      throw err;
    }
  }

  async *manifests(): AsyncIterable<{ digest: string; modifiedAt: number }> {
    const prefix = this.key('manifests', '');
    let token: string | undefined;
    do {
      const res = await this.s3.send(new this.sdk.ListObjectsV2Command({ Bucket: this.config.bucket, Prefix: prefix, ContinuationToken: token }));
      for (const o of res.Contents ?? []) {
        const digest = o.Key!.slice(prefix.length);
        if (DIGEST_RE.test(digest)) yield { digest, modifiedAt: o.LastModified?.getTime() ?? 0 };
      }
      token = res.IsTruncated ? res.NextContinuationToken : undefined;
    } while (token);
  }

  async deleteManifest(digest: string): Promise<void> {
    await this.s3.send(new this.sdk.DeleteObjectCommand({ Bucket: this.config.bucket, Key: this.key('manifests', this.digest(digest)) }));
  }

  private digest(d: string): string {
    if (!DIGEST_RE.test(d)) throw new ValidationError(`not a manifest digest: ${d.slice(0, 80)}`);
    return d;
  }

  async stats(): Promise<{ chunks: number; bytes: number }> {
    let { chunks, bytes } = await this.index.stats();
    for (const p of this.pending.values()) {
      chunks++;
      bytes += p.entry.length;
    }
    return { chunks, bytes };
  }

  // Garbage collection (see src/broker/gc/)

  usage(): AsyncIterable<BlobUse> {
    return this.index.list();
  }

  sweep(ids: readonly ChunkId[], cutoff: number): Promise<{ blobs: number; bytes: number }> {
    return this.index.sweep(ids, cutoff);
  }

  /** Objects are immutable once uploaded: nothing to seal (the pack in memory is not listed). */
  async sealPacks(): Promise<void> {}

  async packs(): Promise<PackInfo[]> {
    const live = new Map((await this.index.packs()).map((p) => [p.name, p.liveBytes]));
    const mine = new Set([...this.sealed, ...(this.current ? [this.current] : [])].map((p) => p.name));
    const out: PackInfo[] = [];
    const prefix = this.key('packs', '');
    let token: string | undefined;
    do {
      const res = await this.s3.send(new this.sdk.ListObjectsV2Command({ Bucket: this.config.bucket, Prefix: prefix, ContinuationToken: token }));
      for (const o of res.Contents ?? []) {
        const name = o.Key!.slice(prefix.length);
        const createdAt = packCreatedAt(name);
        // Another writer indexes its pack only after the upload: a young pack may be on its way.
        const active = mine.has(name) || createdAt === null || (packWriterPid(name) !== process.pid && Date.now() - createdAt < 2 * this.packMaxAgeMs);
        out.push({ name, createdAt, bytes: o.Size ?? 0, liveBytes: live.get(name) ?? 0, active });
      }
      token = res.IsTruncated ? res.NextContinuationToken : undefined;
    } while (token);
    return out;
  }

  /** Whether this process still uploads or publishes `name`. */
  private busy(name: string): boolean {
    return this.current?.name === name || this.sealed.some((p) => p.name === name);
  }

  async compactPack(info: PackInfo): Promise<{ moved: number; freedBytes: number }> {
    const name = info.name;
    if (info.active || this.busy(name)) return { moved: 0, freedBytes: 0 };
    const rows = await this.index.inPack(name);
    if (rows.length) {
      const res = await this.s3.send(new this.sdk.GetObjectCommand({ Bucket: this.config.bucket, Key: this.key('packs', name) }));
      const whole = Buffer.from(await res.Body!.transformToByteArray());
      for (const row of rows) {
        const record = whole.subarray(row.offset, row.offset + RECORD_HEAD + row.length);
        if (record.length !== RECORD_HEAD + row.length || record.readUInt32BE(32) !== row.length || chunkIdFromBytes(record.subarray(0, 32)) !== row.id) {
          throw new CarryonError('store-corrupt', `pack ${name} does not hold chunk ${row.id} at ${row.offset} as its index says`);
        }
        this.append(Buffer.from(record), { id: row.id, length: row.length, from: row });
      }
      await this.sync();
    }
    return { moved: rows.length, freedBytes: await this.dropPack(info) };
  }

  async dropPack(info: PackInfo): Promise<number> {
    const name = info.name;
    if (info.active || this.busy(name) || (await this.index.inPack(name)).length > 0) return 0;
    await this.s3.send(new this.sdk.DeleteObjectCommand({ Bucket: this.config.bucket, Key: this.key('packs', name) }));
    return info.bytes;
  }

  async close(): Promise<void> {
    try {
      await this.sync();
    } finally {
      this.s3.destroy();
      await this.index.close();
    }
  }
}

/** Default place of the S3 store's SQLite pack index next to a data directory. */
export function defaultS3IndexPath(dataDir: string): string {
  return join(dataDir, 's3-pack-index.sqlite');
}
