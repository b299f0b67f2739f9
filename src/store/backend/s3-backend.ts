import type { S3Client } from '@aws-sdk/client-s3';
import { CarryonError } from '../../core/errors.js';
import type { S3StoreConfig } from '../s3-config.js';
import { BufferedPackSink, type Backend, type ObjectInfo, type ObjectKind, type PackSink } from './backend.js';

type Sdk = typeof import('@aws-sdk/client-s3');

/** Packs being uploaded at once before a new one waits (memory: about this many × packBytes). */
const MAX_UPLOADS = 3;
const PART_CONCURRENCY = 4;

function isNotFound(err: unknown): boolean {
  const e = err as { name?: string; $metadata?: { httpStatusCode?: number } };
  return e?.name === 'NoSuchKey' || e?.name === 'NotFound' || e?.$metadata?.httpStatusCode === 404;
}

/**
 * Packs and manifests as objects `<prefix>packs/<name>` and `<prefix>manifests/<digest>` in an
 * S3-compatible bucket. A pack is held in memory and uploaded whole (multipart past one part);
 * records are read back with ranged GETs. Nothing relies on conditional PUTs: pack names are
 * unique per writer, manifests are named by their content.
 *
 * Retries: every request is retried by the SDK (standard mode: exponential backoff with jitter,
 * `maxAttempts`); a pack whose upload still fails stays with the repository, which uploads it
 * again at its next sync.
 */
export class S3Backend implements Backend {
  readonly appendAfterFlush = false;
  /** A request costs a round trip: neighbours this close share one ranged GET. */
  readonly mergeReads = { gap: 512 * 1024, max: 16 * 1024 * 1024 };
  private readonly uploads = new Set<Promise<void>>();

  private constructor(
    private readonly sdk: Sdk,
    private readonly s3: S3Client,
    private readonly config: S3StoreConfig,
  ) {}

  /** A client for `config`; the bucket must answer (or is created with `createBucket`). */
  static async open(config: S3StoreConfig): Promise<S3Backend> {
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
    return new S3Backend(sdk, s3, config);
  }

  get label(): string {
    return `S3 bucket ${this.config.bucket}`;
  }

  private key(kind: ObjectKind, name: string): string {
    return `${this.config.prefix}${kind}/${name}`;
  }

  /** Waits while more than MAX_UPLOADS packs are on their way (memory stays bounded). */
  async createPack(name: string): Promise<PackSink> {
    while (this.uploads.size > MAX_UPLOADS) await Promise.race(this.uploads);
    return new BufferedPackSink(this, name);
  }

  async read(kind: ObjectKind, name: string, offset?: number, length?: number): Promise<Buffer | null> {
    const Range = offset === undefined || length === undefined ? undefined : `bytes=${offset}-${offset + length - 1}`;
    try {
      const res = await this.s3.send(new this.sdk.GetObjectCommand({ Bucket: this.config.bucket, Key: this.key(kind, name), Range }));
      return Buffer.from(await res.Body!.transformToByteArray());
    } catch (err) {
      if (isNotFound(err)) return null;
      throw err;
    }
  }

  async write(kind: ObjectKind, name: string, data: Uint8Array): Promise<void> {
    const upload = this.upload(this.key(kind, name), data);
    if (kind !== 'packs') return upload;
    const tracked = upload.catch(() => undefined).finally(() => this.uploads.delete(tracked));
    this.uploads.add(tracked);
    return upload;
  }

  /** One PUT, or a multipart upload past one part (S3 parts are ≥ 5 MiB except the last). */
  private async upload(Key: string, body: Uint8Array): Promise<void> {
    const Bucket = this.config.bucket;
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

  async *list(kind: ObjectKind): AsyncIterable<ObjectInfo> {
    const prefix = this.key(kind, '');
    let token: string | undefined;
    do {
      const res = await this.s3.send(new this.sdk.ListObjectsV2Command({ Bucket: this.config.bucket, Prefix: prefix, ContinuationToken: token }));
      for (const o of res.Contents ?? []) yield { name: o.Key!.slice(prefix.length), bytes: o.Size ?? 0, modifiedAt: o.LastModified?.getTime() ?? 0 };
      token = res.IsTruncated ? res.NextContinuationToken : undefined;
    } while (token);
  }

  async delete(kind: ObjectKind, name: string): Promise<void> {
    await this.s3.send(new this.sdk.DeleteObjectCommand({ Bucket: this.config.bucket, Key: this.key(kind, name) }));
  }

  async close(): Promise<void> {
    this.s3.destroy();
  }
}
