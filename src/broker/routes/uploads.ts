import { randomUUID } from 'node:crypto';
import { createWriteStream } from 'node:fs';
import { mkdir, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { Transform, type Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import type { FastifyPluginAsync } from 'fastify';
import { z } from 'zod';
import type { BrokerContext } from '../context.js';
import type { ImportJobs } from '../desktops/imports.js';
import { HttpError, parse } from '../http.js';
import { adminOf } from './admin/admin-scope.js';
import { checkImageSize } from '../desktops/image-checks.js';

const Id = z.object({ id: z.uuid() });
const Meta = z.object({ id: z.string(), name: z.string(), sizeBytes: z.number(), createdAt: z.string(), createdBy: z.string() });
type Meta = z.infer<typeof Meta>;

/**
 * Image upload from the admin's machine, streamed and resumable: create an upload with its size,
 * PUT byte ranges in order (`?offset=` = bytes the broker already has; a broken connection keeps
 * what arrived), then import it as a desktop. Kept under the data dir until imported or deleted.
 */
export const uploadRoutes: FastifyPluginAsync<{ ctx: BrokerContext; dir: string; imports: ImportJobs }> = async (app, { ctx, dir, imports }) => {
  const paths = (id: string) => ({ meta: join(dir, `${id}.json`), data: join(dir, `${id}.part`) });
  const load = async (id: string) => {
    let meta: Meta;
    try {
      meta = Meta.parse(JSON.parse(await readFile(paths(id).meta, 'utf8')));
    } catch {
      throw new HttpError(404, 'not-found', `no upload ${id}`);
    }
    const received = (await stat(paths(id).data).catch(() => ({ size: 0 }))).size;
    return { ...meta, received, complete: received === meta.sizeBytes };
  };

  app.post('/v1/admin/uploads', async (req, reply) => {
    const actor = adminOf(req);
    const b = parse(z.object({ name: z.string().min(1).max(255), sizeBytes: z.number().int().min(0).max(2 ** 50) }).strict(), req.body);
    checkImageSize(b.sizeBytes, undefined, b.name);
    await mkdir(dir, { recursive: true, mode: 0o700 });
    const meta: Meta = { id: randomUUID(), name: b.name, sizeBytes: b.sizeBytes, createdAt: new Date().toISOString(), createdBy: actor };
    await writeFile(paths(meta.id).data, Buffer.alloc(0), { mode: 0o600 });
    await writeFile(paths(meta.id).meta, JSON.stringify(meta), { mode: 0o600 });
    await ctx.audit({ actor, action: 'upload-start', outcome: 'ok', detail: `${meta.id}: ${b.name}, ${b.sizeBytes} bytes` });
    return reply.status(201).send({ ...meta, received: 0, complete: b.sizeBytes === 0 });
  });
  app.get('/v1/admin/uploads/:id', async (req) => {
    return load(parse(Id, req.params).id);
  });
  app.delete('/v1/admin/uploads/:id', async (req) => {
    const actor = adminOf(req);
    const { id } = parse(Id, req.params);
    await load(id);
    await rm(paths(id).data, { force: true });
    await rm(paths(id).meta, { force: true });
    await ctx.audit({ actor, action: 'upload-delete', outcome: 'ok', detail: id });
    return { ok: true };
  });

  app.register(async (raw) => {
    raw.addContentTypeParser('application/octet-stream', (_req, payload, done) => done(null, payload));
    raw.put('/v1/admin/uploads/:id', async (req) => {
      const { id } = parse(Id, req.params);
      const { offset } = parse(z.object({ offset: z.coerce.number().int().min(0) }), req.query);
      const up = await load(id);
      if (offset !== up.received) throw new HttpError(409, 'offset-mismatch', `the broker has ${up.received} bytes of this upload; send from offset ${up.received}`, { received: up.received });
      const body = req.body as Readable | undefined;
      if (!body || typeof body.pipe !== 'function') throw new HttpError(415, 'octet-stream', 'send the bytes as application/octet-stream');
      let n = up.received;
      const limit = new Transform({
        transform(chunk: Buffer, _enc, cb) {
          n += chunk.length;
          if (n > up.sizeBytes) cb(new HttpError(400, 'too-long', `the upload was declared as ${up.sizeBytes} bytes`));
          else cb(null, chunk);
        },
      });
      try {
        await pipeline(body, limit, createWriteStream(paths(id).data, { flags: 'a' }));
      } catch (err) {
        if (err instanceof HttpError) throw err;
        // A cut connection keeps what arrived; the client asks for `received` and resumes.
        throw new HttpError(400, 'upload-interrupted', `the upload stopped after ${n} bytes: ${(err as Error).message}`, { received: (await load(id)).received });
      }
      return load(id);
    });
  });

  app.post('/v1/admin/uploads/:id/import', async (req, reply) => {
    const actor = adminOf(req);
    const { id } = parse(Id, req.params);
    const b = parse(z.object({
      name: z.string().regex(/^[A-Za-z0-9._@-]{1,64}$/, 'letters, digits and . _ @ - only (max 64)'), pool: z.string().max(200).optional(), chunkSize: z.number().int().optional(),
      config: z.object({ vcpus: z.number().int().min(1).max(256).default(2), ramMiB: z.number().int().min(64).max(1 << 20).default(2048), minRamMiB: z.number().int().min(64).max(1 << 20).default(512), nic: z.enum(['user', 'none']).default('user'), usb: z.boolean().default(false) }).strict().default({ vcpus: 2, ramMiB: 2048, minRamMiB: 512, nic: 'user', usb: false }),
    }).strict(), req.body);
    const up = await load(id);
    if (!up.complete) throw new HttpError(409, 'incomplete', `the broker has ${up.received} of ${up.sizeBytes} bytes; finish the upload first`, { received: up.received });
    const job = await imports.start(ctx, actor, { name: b.name, image: paths(id).data, pool: b.pool, config: b.config, chunkSize: b.chunkSize }, (ok) => {
      // Imported: the upload is no longer needed. Failed: kept, to retry the import without sending it again.
      if (ok) void rm(paths(id).meta, { force: true }).then(() => rm(paths(id).data, { force: true }));
    });
    return reply.status(202).send({ import: job });
  });
};
