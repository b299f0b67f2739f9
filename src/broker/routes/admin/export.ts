import { Readable } from 'node:stream';
import type { FastifyPluginAsync } from 'fastify';
import { z } from 'zod';
import { chunkLength } from '../../../core/chunks/chunking.js';
import { unwrapLineageKeys } from '../../../core/keys.js';
import { decodeManifest } from '../../../core/chunks/manifest.js';
import { readChunkPlain } from '../../../import/export.js';
import type { BrokerContext } from '../../context.js';
import { damagedSnapshotRefusal } from '../../desktops/damage.js';
import { HttpError, parse } from '../../http.js';
import { adminOf } from './admin-scope.js';
import { restorePoints } from '../../desktops/restore-point-list.js';

/**
 * `GET /v1/admin/desktops/:id/export?snapshot=&disk=`: one disk of a snapshot (the current one by
 * default) as a raw image, streamed chunk by chunk in plaintext over the admin's TLS session.
 * Each chunk is authenticated before it is sent; one that fails cuts the stream (the client sees
 * a short body, never wrong bytes). Audited when it starts and when it ends.
 */
export const exportRoutes: FastifyPluginAsync<{ ctx: BrokerContext }> = async (app, { ctx }) => {
  app.get('/v1/admin/desktops/:id/export', async (req, reply) => {
    const actor = adminOf(req);
    const { id } = parse(z.object({ id: z.string().max(200) }), req.params);
    const q = parse(z.object({ snapshot: z.string().max(200).optional(), disk: z.string().max(64).optional() }).strict(), req.query);
    const found = await ctx.meta.getDesktop(id);
    if (!found) throw new HttpError(404, 'not-found', `no desktop ${id}`);
    const desktop = found;
    const points = await restorePoints(ctx, desktop);
    const snapshotId = q.snapshot ?? points.find((p) => p.current)?.id ?? desktop.currentSnapshot;
    if (!snapshotId || (q.snapshot && !points.some((p) => p.id === q.snapshot))) throw new HttpError(404, 'not-found', `${desktop.name} has no restore point ${q.snapshot ?? '(no snapshot yet)'}`);
    const snapshot = (await ctx.meta.getSnapshot(snapshotId))!;
    const disk = q.disk ? snapshot.disks.find((d) => d.name === q.disk) : snapshot.disks[0];
    if (!disk) throw new HttpError(404, 'not-found', `snapshot ${snapshotId} has no disk ${q.disk} (it has ${snapshot.disks.map((d) => d.name).join(', ')})`);
    const refusal = await damagedSnapshotRefusal(ctx, desktop, snapshotId, [disk]);
    if (refusal) {
      await ctx.audit({ actor, desktopId: desktop.id, action: 'export', outcome: 'denied', detail: `${refusal.code}: ${refusal.message}` });
      throw new HttpError(refusal.status, refusal.code, refusal.message, refusal.extra, true);
    }
    const raw = await ctx.store.getManifest(disk.digest);
    if (!raw) throw new HttpError(500, 'store-corrupt', `manifest ${disk.digest} is missing from the store`);
    const manifest = decodeManifest(raw);
    const wrapped = await ctx.meta.getLineageKeys(desktop.lineageId);
    if (!wrapped) throw new HttpError(500, 'lineage-missing', `lineage ${desktop.lineageId} has no keys`);
    const keys = unwrapLineageKeys(ctx.secrets.masterKey, wrapped, `lineage:${desktop.lineageId}`);
    const what = `snapshot ${snapshotId}, disk ${disk.name} (${manifest.diskSize} bytes, raw)`;
    await ctx.audit({ actor, desktopId: desktop.id, action: 'export', outcome: 'ok', detail: `started: ${what}` });
    async function* chunks() {
      let sent = 0;
      try {
        for (let i = 0; i < manifest.chunks.length; i++) {
          const length = chunkLength(i, manifest.diskSize, manifest.chunkSize);
          const plain = await readChunkPlain(manifest, { store: ctx.store, keys }, i);
          yield plain ?? Buffer.alloc(length);
          sent += length;
        }
        await ctx.audit({ actor, desktopId: desktop.id, action: 'export', outcome: 'ok', detail: `done: ${what}` });
      } catch (err) {
        await ctx.audit({ actor, desktopId: desktop.id, action: 'export', outcome: 'failed', detail: `${what}: stopped after ${sent} bytes: ${(err as Error).message}` });
        throw err;
      }
    }
    return reply.header('content-type', 'application/octet-stream').header('content-length', manifest.diskSize)
      .header('x-carryon-snapshot', snapshotId).header('x-carryon-disk', disk.name).send(Readable.from(chunks()));
  });
};
