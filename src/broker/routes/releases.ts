import { createHash, randomBytes } from 'node:crypto';
import { createReadStream, createWriteStream } from 'node:fs';
import { mkdir, rename, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { Transform, type Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import type { FastifyPluginAsync } from 'fastify';
import { z } from 'zod';
import { CarryonError } from '../../core/errors.js';
import { MAX_BUNDLE_BYTES, parseSignatureFile, RELEASE_SIGNATURE_HEADER, VERSION_RE, verifyRelease, type ReleaseManifest, type ReleaseSignature } from '../../core/tokens/release.js';
import type { BrokerContext } from '../context.js';
import { HttpError, parse } from '../http.js';
import { deviceOf } from './agent/agent-scope.js';
import { drainRefusedBody } from '../../net/body-limits.js';
import type { ReleaseRow } from '../releases/store.js';
import { adminOf } from './admin/admin-scope.js';

const SIGNATURE_HEADER = RELEASE_SIGNATURE_HEADER;
const VersionParam = z.object({ version: z.string().regex(VERSION_RE, 'a version is MAJOR.MINOR.PATCH') });

/**
 * Bundles are files in the broker's data dir (`releases/<version>.tgz`), not chunks in the chunk
 * store: a bundle is public (its authority is the signature, not secrecy), read whole and by byte
 * range, and a few MiB; the chunk store's per-lineage encryption and dedup buy nothing for it.
 * Brokers sharing one database each need the bundle: publish to each (a broker without the file
 * answers 404 `bundle-missing`, and the laptop tries again at its next heartbeat).
 */
export const bundlePath = (dir: string, version: string) => join(dir, `${version}.tgz`);

/** What the heartbeat answer offers: enough to fetch the bundle and verify it with the pinned key. */
export function offerOf(r: ReleaseRow) {
  return { version: r.version, size: r.size, sha256: r.sha256, signature: { manifest: r.manifest, signature: r.signature } };
}

/** The signature header, checked against the configured key and the request, before the body is read. */
async function checkPublish(ctx: BrokerContext, actor: string, version: string, headers: Record<string, string | string[] | undefined>): Promise<{ manifest: ReleaseManifest; sig: ReleaseSignature }> {
  const { releases } = ctx;
  if (!releases.key) throw new HttpError(409, 'no-release-key', 'this broker has no release public key configured (`carryon server --release-key FILE`): it cannot check a release');
  const header = headers[SIGNATURE_HEADER];
  if (typeof header !== 'string') throw new HttpError(400, 'invalid', `send the signature file in the ${SIGNATURE_HEADER} header (base64)`);
  let manifest: ReleaseManifest;
  let sig: ReleaseSignature;
  try {
    sig = parseSignatureFile(Buffer.from(header, 'base64').toString('utf8'), 'the signature header');
    manifest = verifyRelease(releases.key, sig);
  } catch (err) {
    const message = (err as Error).message;
    await ctx.audit({ actor, action: 'release-publish', outcome: 'denied', detail: `${version}: ${message}` });
    throw new HttpError(400, err instanceof CarryonError ? err.code : 'invalid', message, {}, true);
  }
  if (manifest.version !== version) throw new HttpError(400, 'invalid', `the signature is for version ${manifest.version}, not ${version}`);
  if (manifest.size > MAX_BUNDLE_BYTES) throw new HttpError(413, 'too-large', `bundles are at most ${MAX_BUNDLE_BYTES} bytes`);
  const declared = Number(headers['content-length']);
  if (Number.isFinite(declared) && declared !== manifest.size) throw new HttpError(400, 'bundle-mismatch', `the body is ${declared} bytes; the signed manifest says ${manifest.size}`);
  if (await releases.store.release(version)) throw new HttpError(409, 'exists', `version ${version} is already published; a version names one bundle for good (publish a newer one)`);
  return { manifest, sig };
}

export const releaseAdminRoutes: FastifyPluginAsync<{ ctx: BrokerContext }> = async (app, { ctx }) => {
  const { releases } = ctx;
  await app.register(async (raw) => {
    raw.addContentTypeParser('application/octet-stream', (_req, payload, done) => done(null, payload));
    raw.put('/v1/admin/releases/:version', { bodyLimit: MAX_BUNDLE_BYTES }, async (req, reply) => {
      const actor = adminOf(req);
      const { version } = parse(VersionParam, req.params);
      // Refused before a byte of the body is read: the rest is read and dropped, so the sender (still streaming) sees the answer.
      const { manifest, sig } = await checkPublish(ctx, actor, version, req.headers).catch((err: unknown) => {
        drainRefusedBody(req, reply);
        throw err;
      });
      const body = req.body as Readable | undefined;
      if (!body || typeof body.pipe !== 'function') throw new HttpError(415, 'octet-stream', 'send the bundle as application/octet-stream');
      await mkdir(releases.dir, { recursive: true, mode: 0o700 });
      const part = join(releases.dir, `${version}.${randomBytes(6).toString('hex')}.part`);
      const hash = createHash('sha256');
      let n = 0;
      // Bounded by the signed size while it streams: nothing past it reaches the disk.
      const bound = new Transform({
        transform(chunk: Buffer, _enc, cb) {
          n += chunk.length;
          if (n > manifest.size) cb(new HttpError(400, 'bundle-mismatch', `the bundle is longer than the ${manifest.size} bytes signed`));
          else cb(null, (hash.update(chunk), chunk));
        },
      });
      try {
        await pipeline(body, bound, createWriteStream(part, { mode: 0o600 }));
        const sha256 = hash.digest('hex');
        if (n !== manifest.size || sha256 !== manifest.sha256) throw new HttpError(400, 'bundle-mismatch', `the bundle (${n} bytes, sha256 ${sha256.slice(0, 12)}…) is not the one signed (${manifest.size} bytes, ${manifest.sha256.slice(0, 12)}…)`);
        await rename(part, bundlePath(releases.dir, version));
      } catch (err) {
        await rm(part, { force: true });
        await ctx.audit({ actor, action: 'release-publish', outcome: 'denied', detail: `${version}: ${(err as Error).message}` });
        if (err instanceof HttpError) throw new HttpError(err.status, err.code, err.message, err.extra, true);
        throw new HttpError(400, 'upload-interrupted', `the upload stopped after ${n} bytes: ${(err as Error).message}`, {}, true);
      }
      const added = await releases.store.add({ version, sha256: manifest.sha256, size: manifest.size, manifest: sig.manifest, signature: sig.signature, publishedAt: new Date().toISOString(), publishedBy: actor });
      if (!added) throw new HttpError(409, 'exists', `version ${version} was published meanwhile`);
      await ctx.audit({ actor, action: 'release-publish', outcome: 'ok', detail: `${version}: ${manifest.size} bytes, sha256 ${manifest.sha256}` });
      return reply.status(201).send({ version, size: manifest.size, sha256: manifest.sha256, ring: 'none' });
    });
  });

  app.get('/v1/admin/releases', async () => {
    const devices = await releases.store.devices();
    return {
      releaseKey: releases.keyB64,
      releases: (await releases.store.releases()).map(({ manifest: _m, signature: _s, ...r }) => ({ ...r, devicesRunning: devices.filter((d) => d.runningVersion === r.version).length })),
    };
  });

  app.post('/v1/admin/releases/:version/rollout', async (req) => {
    const actor = adminOf(req);
    const { version } = parse(VersionParam, req.params);
    const { ring } = parse(z.object({ ring: z.enum(['canary', 'all', 'none']) }).strict(), req.body);
    if (!(await releases.store.rollout(version, ring))) throw new HttpError(404, 'not-found', `no published release ${version}`);
    await ctx.audit({ actor, action: 'release-rollout', outcome: 'ok', detail: `${version} to ${ring === 'none' ? 'nobody (withdrawn)' : ring === 'all' ? 'every device' : 'canary devices'}` });
    return { version, ring };
  });

  app.post('/v1/admin/devices/:id/ring', async (req) => {
    const actor = adminOf(req);
    const { id } = parse(z.object({ id: z.string().max(200) }), req.params);
    const { ring } = parse(z.object({ ring: z.enum(['canary', 'stable']) }).strict(), req.body);
    if (!(await ctx.meta.getDevice(id))) throw new HttpError(404, 'not-found', `no device ${id}`);
    await releases.store.setRing(id, ring);
    await ctx.audit({ actor, action: 'device-ring', outcome: 'ok', detail: `${id}: ${ring}` });
    return { deviceId: id, ring };
  });
};

const UpdateReport = z.object({
  version: z.string().regex(VERSION_RE),
  state: z.enum(['downloading', 'verified', 'waiting', 'installed', 'switched', 'done', 'refused', 'rolled-back', 'failed']),
  detail: z.string().max(2000).optional(),
}).strict();
/** States that end an update attempt: audited (the steps between are only recorded on the device's row). */
const FINAL = new Set(['done', 'refused', 'rolled-back', 'failed']);

/** Agent side: the bundle by byte range (resumable) and the steps of an update (agent scope). */
export const releaseAgentRoutes: FastifyPluginAsync<{ ctx: BrokerContext }> = async (app, { ctx }) => {
  const { releases } = ctx;
  app.get('/v1/agent/releases/:version/bundle', async (req, reply) => {
    const device = deviceOf(req);
    const { version } = parse(VersionParam, req.params);
    const r = await releases.store.release(version);
    const ring = (await releases.store.device(device.id)).ring;
    // Only what is rolled out to this device's ring: a withdrawn release stops being served.
    if (!r || !(r.ring === 'all' || (r.ring === 'canary' && ring === 'canary'))) throw new HttpError(404, 'not-found', `release ${version} is not rolled out to this device`);
    const range = /^bytes=(\d+)-(\d*)$/.exec(String(req.headers.range ?? ''));
    const start = range ? Number(range[1]) : 0;
    const end = range && range[2] ? Math.min(Number(range[2]), r.size - 1) : r.size - 1;
    if (start > end || start >= r.size) {
      return reply.status(416).header('content-range', `bytes */${r.size}`).send({ error: 'range', message: `the bundle is ${r.size} bytes` });
    }
    const stream = createReadStream(bundlePath(releases.dir, version), { start, end });
    await new Promise<void>((resolve, reject) => {
      stream.once('open', () => resolve());
      stream.once('error', (err) => reject((err as NodeJS.ErrnoException).code === 'ENOENT' ? new HttpError(404, 'bundle-missing', `this broker does not have the bundle of ${version} (publish it here too)`) : err));
    });
    reply.status(range ? 206 : 200).header('content-type', 'application/octet-stream').header('content-length', String(end - start + 1)).header('accept-ranges', 'bytes');
    if (range) reply.header('content-range', `bytes ${start}-${end}/${r.size}`);
    return reply.send(stream);
  });

  app.post('/v1/agent/update', async (req) => {
    const device = deviceOf(req);
    const b = parse(UpdateReport, req.body);
    await releases.store.setState(device.id, { state: b.state, targetVersion: b.version, detail: b.detail ?? null });
    if (FINAL.has(b.state)) {
      await ctx.audit({ actor: `device:${device.id}`, action: 'client-update', outcome: b.state === 'done' ? 'ok' : 'failed', detail: `${b.version}: ${b.state}${b.detail ? `: ${b.detail}` : ''}` });
    }
    return { ok: true };
  });
};
