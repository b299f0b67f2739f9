import { CarryonError } from '../core/errors.js';

/** Where an S3 chunk store lives, parsed from `s3://bucket/prefix?endpoint=…&region=…&index=…`. */
export interface S3StoreConfig {
  bucket: string;
  /** Key prefix inside the bucket ('' or ending in '/'). */
  prefix: string;
  /** S3 API endpoint (Swift s3api, MinIO, Ceph RGW…); AWS when absent. */
  endpoint?: string;
  /** Region; else AWS_REGION / the AWS config file; else us-east-1. */
  region?: string;
  /** Path-style URLs (`endpoint/bucket/key`); default true with a custom endpoint. */
  forcePathStyle: boolean;
  /** The pack index: an SQLite file, or a postgres:// URL. Every process writing the bucket must share it. */
  indexPath?: string;
  /** Create the bucket when it does not exist. */
  createBucket: boolean;
  /** Explicit keys (tests); else the SDK's chain: AWS_ACCESS_KEY_ID…, AWS_PROFILE, ~/.aws/*. */
  credentials?: { accessKeyId: string; secretAccessKey: string };
  /** Attempts per request (exponential backoff with jitter between them). */
  maxAttempts: number;
  /** Packs are uploaded once they reach this size (or at sync). */
  packBytes: number;
  /** Multipart part size for packs larger than one part. */
  partBytes: number;
}

const MiB = 1024 * 1024;

export function isS3Url(s: string): boolean {
  return s.startsWith('s3://');
}

/**
 * `s3://bucket[/prefix][?endpoint=URL&region=R&index=PATH&pathStyle=true|false&create=true]`.
 * Credentials never go in the URL: they come from the usual AWS variables or files.
 */
export function parseS3Url(url: string, defaults: { indexPath?: string } = {}): S3StoreConfig {
  let u: URL;
  try {
    u = new URL(url);
  } catch {
    throw new CarryonError('bad-config', `not a chunk store URL: ${url}`);
  }
  if (u.protocol !== 's3:' || !u.hostname) throw new CarryonError('bad-config', `chunk store URL must look like s3://bucket/prefix?endpoint=…, got ${url}`);
  if (u.username || u.password) throw new CarryonError('bad-config', 'put S3 credentials in AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or ~/.aws/credentials, not in the URL');
  const q = u.searchParams;
  const known = new Set(['endpoint', 'region', 'index', 'pathStyle', 'create', 'maxAttempts', 'packMiB', 'partMiB']);
  for (const k of q.keys()) if (!known.has(k)) throw new CarryonError('bad-config', `unknown chunk store URL parameter ${k} (known: ${[...known].join(', ')})`);
  const prefix = decodeURIComponent(u.pathname.replace(/^\/+/, ''));
  const endpoint = q.get('endpoint') ?? undefined;
  const num = (k: string, d: number, min: number) => {
    const v = q.get(k);
    if (v === null) return d;
    const n = Number(v);
    if (!Number.isInteger(n) || n < min) throw new CarryonError('bad-config', `${k} must be an integer ≥ ${min}, got ${v}`);
    return n;
  };
  return {
    bucket: u.hostname,
    prefix: prefix && !prefix.endsWith('/') ? `${prefix}/` : prefix,
    endpoint,
    region: q.get('region') ?? undefined,
    forcePathStyle: q.get('pathStyle') ? q.get('pathStyle') === 'true' : Boolean(endpoint),
    indexPath: q.get('index') ?? defaults.indexPath,
    createBucket: q.get('create') === 'true',
    maxAttempts: num('maxAttempts', 6, 1),
    // S3 parts are ≥ 5 MiB except the last.
    packBytes: num('packMiB', 64, 1) * MiB,
    partBytes: num('partMiB', 8, 5) * MiB,
  };
}
