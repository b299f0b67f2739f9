import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, test } from 'node:test';
import { request } from 'undici';
import { Scheduler } from '../../src/broker/transfers/scheduler.js';
import { SchedulerStore } from '../../src/broker/transfers/scheduler-store.js';
import { SqliteSql } from '../../src/sql/sqlite-driver.js';
import type { JobView } from '../../src/broker/transfers/types.js';
import { openBlob, sealChunk } from '../../src/core/chunks/blob.js';
import { computeChunkId } from '../../src/core/chunk-id.js';
import { receiptHolds, receiptKey } from '../../src/core/tokens/push-receipt.js';
import { sealPages } from '../../src/core/chunks/delta.js';
import { generateLineageKeys } from '../../src/core/keys.js';
import { createManifest } from '../../src/core/chunks/manifest.js';
import { generateSigningKey } from '../../src/core/signing.js';
import { signTicket } from '../../src/core/tokens/ticket.js';
import { pinnedAgent } from '../../src/net/pinned-agent.js';
import { FsChunkStore } from '../../src/store/fs-chunk-store.js';
import { downloadChunks, TransferSession, type TransferEndpoint } from '../../src/transfer-client/client.js';
import { blobFrame, encodeFrame, endFrame, FRAME_BLOB, FRAME_PAGES, FRAME_ERROR, FrameDecoder, pagesFrameHead } from '../../src/core/chunks/frames.js';
import { pushPages } from '../../src/transfer-client/push-pages.js';
import { RateLimiter } from '../../src/transfer-client/rate-limit.js';
import { startTransferServer, type TransferServer } from '../../src/transfer/server.js';
import { RemoteCheckpoint } from '../../src/live/fill/remote-checkpoint.js';
import { rawChunkBlob, rawPagesBlob, rleBomb, seeded } from '../support/hostile-zstd.js';
import { makeDesktopStore, wrapped } from './helpers.js';

const dir = mkdtempSync(join(tmpdir(), 'carryon-transfer-'));
const servers: TransferServer[] = [];
after(async () => {
  await Promise.all(servers.map((s) => s.close()));
  rmSync(dir, { recursive: true, force: true });
});

const keys = generateLineageKeys();
const master = randomBytes(32);
const broker = generateSigningKey();
const desk = await makeDesktopStore(dir, keys, 40);
const ids = desk.manifest.chunks.filter((c): c is string => c !== null);

async function server(id: string, slots: number, tamper?: Parameters<typeof startTransferServer>[0]['tamper']): Promise<TransferServer> {
  const s = await startTransferServer({ id, slots, store: desk.store, masterKey: master, brokerPublicKey: broker.publicKey, tlsDir: join(dir, `tls-${id}`), tamper });
  servers.push(s);
  return s;
}

function endpoint(j: JobView): TransferEndpoint {
  assert.ok(j.transfer, `job ${j.id} has no ticket`);
  return j.transfer;
}

/** A server-side tamper hook: the first `n` distinct blobs sent get one byte flipped, once each. */
function tamperFirst(n: number) {
  const hit = new Set<string>();
  return (id: string, blob: Buffer): Buffer => {
    if (hit.has(id) || hit.size >= n) return blob;
    hit.add(id);
    const bad = Buffer.from(blob);
    bad[bad.length - 5]! ^= 0xff;
    return bad;
  };
}

/** A check-in's pages source: chunk `tag` is one fresh page over zeros (no base needed). */
const freshPages = {
  async frame(tag: number) {
    const blob = sealPages(keys, null, desk.manifest.chunkSize, [{ offset: 0, bytes: randomBytes(4096) }]);
    return { parts: [pagesFrameHead(tag, null, blob.length), blob] };
  },
};

async function allPresent(store: FsChunkStore): Promise<boolean> {
  return (await store.missing(ids)).length === 0;
}

test('three servers with 1, 2 and 4 slots run 10 simultaneous jobs without ever exceeding a slot count', async () => {
  const sched = new Scheduler(await SchedulerStore.open(SqliteSql.open(':memory:')), { signingKey: broker.privateKey, heartbeatSec: 60 });
  for (const [id, slots] of [['ts-a', 1], ['ts-b', 2], ['ts-c', 4]] as const) {
    const s = await server(id, slots);
    await sched.registerServer({ id: s.id, url: s.url, fingerprint: s.fingerprint, slots });
  }
  const slotsOf: Record<string, number> = { 'ts-a': 1, 'ts-b': 2, 'ts-c': 4 };
  let maxSeen = 0;
  const check = async () => {
    const o = await sched.overview();
    for (const s of o.servers) {
      assert.ok(s.inUse <= slotsOf[s.id]!, `${s.id} runs ${s.inUse} jobs with ${s.slots} slots`);
    }
    maxSeen = Math.max(maxSeen, o.active.length);
  };
  const req = { checkoutId: 'c', desktopId: 'd', manifests: [desk.digest], ...wrapped(master, keys) };
  const jobs: JobView[] = [];
  for (let i = 0; i < 10; i++) jobs.push(await sched.enqueue({ ...req, kind: i % 3 === 0 ? 'checkin' : 'checkout' }));
  await check();
  const done: string[] = [];
  await Promise.all(
    jobs.map(async (job, i) => {
      const local = await FsChunkStore.open(join(dir, `client-${i}`));
      for (let tries = 0; tries < 2000; tries++) {
        const j = (await sched.get(job.id))!;
        await check();
        if (j.state === 'active') {
          if (j.kind === 'checkout') await downloadChunks({ endpoint: endpoint(j), ids, localStore: local, keys });
          else await pushPages({ endpoint: endpoint(j), count: 8, source: freshPages, named: new Map(), receipts: new Map() });
          await sched.finish(j.id, 'done');
          done.push(j.id);
          if (j.kind === 'checkout') assert.ok(await allPresent(local));
          return;
        }
        await new Promise((r) => setTimeout(r, 10));
      }
      assert.fail(`job ${job.id} never became active`);
    }),
  );
  assert.equal(done.length, 10);
  assert.equal(maxSeen, 7, 'all seven slots were used at once');
});

test('a transfer killed half-way resumes, fetching only what is missing', async () => {
  const s = await server('ts-r', 2);
  const local = await FsChunkStore.open(join(dir, 'resume'));
  const ticket = (expiresInSec = 600) =>
    signTicket({ v: 1, jobId: 'job-r', desktopId: 'd', checkoutId: 'c', direction: 'download', manifests: [desk.digest], ...wrapped(master, keys), transferServerId: s.id, maxStreams: 1, expiresAt: new Date(Date.now() + expiresInSec * 1000).toISOString() }, broker.privateKey);
  const ep = { url: s.url, fingerprint: s.fingerprint, ticket: ticket(), maxStreams: 1 };
  const abort = new AbortController();
  await assert.rejects(
    downloadChunks({ endpoint: ep, ids, localStore: local, keys, batchSize: 4, streams: 1, signal: abort.signal, onProgress: (p) => p.chunksDone >= 12 && abort.abort() }),
  );
  const have = ids.length - (await local.missing(ids)).length;
  assert.ok(have >= 12 && have < ids.length, `kept ${have} chunks`);
  const before = s.stats.perJob.get('job-r')!.chunksOut;
  const res = await downloadChunks({ endpoint: ep, ids, localStore: local, keys });
  assert.equal(res.chunksMoved, ids.length - have);
  assert.equal(s.stats.perJob.get('job-r')!.chunksOut - before, ids.length - have, 'nothing sent twice');
  assert.ok(await allPresent(local));
});

test('a blob tampered in flight is refused and fetched again', async () => {
  const s = await server('ts-t', 1, tamperFirst(3));
  const t = signTicket({ v: 1, jobId: 'job-t', desktopId: 'd', checkoutId: 'c', direction: 'download', manifests: [desk.digest], ...wrapped(master, keys), transferServerId: s.id, maxStreams: 2, expiresAt: new Date(Date.now() + 600_000).toISOString() }, broker.privateKey);
  const local = await FsChunkStore.open(join(dir, 'tamper'));
  const res = await downloadChunks({ endpoint: { url: s.url, fingerprint: s.fingerprint, ticket: t, maxStreams: 2 }, ids, localStore: local, keys });
  assert.equal(res.refetched, 3);
  assert.ok(await allPresent(local));
});

test('check-in pages: the server rebuilds and names each chunk; a base outside the checkpoint goes whole; a hole and an unchanged chunk are named so; forged pages are refused', async () => {
  const s = await server('ts-p', 2);
  const CS = desk.manifest.chunkSize;
  const plainOf = async (id: string) => openBlob(keys, id, (await desk.store.get(id))!);
  // A base in the store (another desktop's, say) that this checkout's checkpoint does not hold: never a base here.
  const stranger = sealChunk(keys, randomBytes(CS));
  await desk.store.put(stranger.id, stranger.blob);
  const written = randomBytes(4096);
  const edit = async (base: Buffer) => {
    const next = Buffer.from(base);
    written.copy(next, 4096);
    return next;
  };
  const items = [
    { baseId: ids[0]!, next: await edit(await plainOf(ids[0]!)), pieces: [{ offset: 4096, bytes: written }] },
    { baseId: stranger.id, next: await edit(openBlob(keys, stranger.id, stranger.blob)), pieces: [{ offset: 4096, bytes: written }] },
    { baseId: null, next: Buffer.alloc(CS), pieces: [{ offset: 0, bytes: Buffer.alloc(4096) }] },
    { baseId: ids[1]!, next: await plainOf(ids[1]!), pieces: [{ offset: 0, bytes: (await plainOf(ids[1]!)).subarray(0, 4096) }] },
  ];
  const sentWhole: number[] = [];
  const source = (forge = false) => ({
    async frame(tag: number, whole: boolean) {
      const it = items[tag]!;
      if (whole) sentWhole.push(tag);
      const blob = whole ? sealPages(keys, null, CS, [{ offset: 0, bytes: it.next }]) : sealPages(keys, it.baseId, CS, it.pieces);
      if (forge) blob[blob.length - 1]! ^= 1;
      return { parts: [pagesFrameHead(tag, whole ? null : it.baseId, blob.length), blob] };
    },
  });
  const t = signTicket({ v: 1, jobId: 'job-p', desktopId: 'd', checkoutId: 'c-p', direction: 'upload', manifests: [desk.digest], baseManifests: [desk.digest], ...wrapped(master, keys), transferServerId: s.id, maxStreams: 2, expiresAt: new Date(Date.now() + 600_000).toISOString() }, broker.privateKey);
  const endpoint = { url: s.url, fingerprint: s.fingerprint, ticket: t, maxStreams: 2 };
  const named = new Map<number, string | null>();
  const receipts = new Map<string, string>();
  const before = s.stats.bytesIn;
  const res = await pushPages({ endpoint, count: items.length, source: source(), named, receipts });
  assert.equal(res.chunksMoved, 4);
  assert.deepEqual(sentWhole, [1], 'only the chunk whose base the server may not use went whole');
  const onWire = s.stats.bytesIn - before;
  assert.ok(onWire < 4 * 4096 + CS + 4000, `${onWire} bytes on the wire`);
  assert.equal(named.get(2), null, 'zeros are a hole');
  assert.equal(named.get(3), ids[1], 'written back with the same bytes: no change');
  for (const tag of [0, 1]) {
    const id = named.get(tag)!;
    assert.equal(id, computeChunkId(keys.idKey, items[tag]!.next));
    assert.ok(openBlob(keys, id, (await desk.store.get(id))!).equals(items[tag]!.next), 'stored, sealed and verifiable');
    // Each name comes with a receipt binding this check-out and lineage (the broker's key, derived from the same master key).
    const subject = { checkoutId: 'c-p', keyContext: wrapped(master, keys).keyContext, id };
    assert.ok(receiptHolds(receiptKey(master), subject, receipts.get(id)), 'a valid push receipt for this check-out');
    assert.ok(!receiptHolds(receiptKey(master), { ...subject, checkoutId: 'c-other' }, receipts.get(id)), 'not for another check-out');
    assert.ok(!receiptHolds(receiptKey(randomBytes(32)), subject, receipts.get(id)), 'not under another master key');
  }
  // Named chunks are not sent again; a forged frame is refused with the reason, and nothing is named.
  await pushPages({ endpoint, count: items.length, source: source(true), named, receipts });
  const none = new Map<number, string | null>();
  await assert.rejects(pushPages({ endpoint, count: items.length, source: source(true), named: none, receipts: new Map() }), /refused .*GCM tag does not verify/);
  assert.equal(none.size, 0);
});

test('a push counts each frame against its rate limit at least at frameCharge (a background replica pays for the chunk the server rewrites)', async () => {
  const s = await server('ts-c', 2);
  const CS = desk.manifest.chunkSize;
  /** Records what each frame is charged; never waits. */
  class Recording extends RateLimiter {
    readonly charged: number[] = [];
    override async take(bytes: number): Promise<void> {
      this.charged.push(bytes);
    }
  }
  const page = randomBytes(4096);
  const source = { async frame(tag: number) {
    const blob = sealPages(keys, ids[tag]!, CS, [{ offset: 0, bytes: page }]);
    return { parts: [pagesFrameHead(tag, ids[tag]!, blob.length), blob] };
  } };
  const t = signTicket({ v: 1, jobId: 'job-c', desktopId: 'd', checkoutId: 'c-c', direction: 'upload', manifests: [desk.digest], baseManifests: [desk.digest], ...wrapped(master, keys), transferServerId: s.id, maxStreams: 1, expiresAt: new Date(Date.now() + 600_000).toISOString() }, broker.privateKey);
  const endpoint = { url: s.url, fingerprint: s.fingerprint, ticket: t, maxStreams: 1 };
  const plain = new Recording(1);
  await pushPages({ endpoint, count: 3, source, named: new Map(), receipts: new Map(), rateLimit: plain });
  assert.equal(plain.charged.length, 3);
  for (const c of plain.charged) assert.ok(c > 4096 && c < 4096 + 200, `a frame of one page is charged its wire bytes (${c})`);
  const paced = new Recording(1);
  await pushPages({ endpoint, count: 3, source, named: new Map(), receipts: new Map(), rateLimit: paced, frameCharge: CS / 4 });
  assert.deepEqual(paced.charged, [CS / 4, CS / 4, CS / 4], 'each small frame counts as a quarter chunk');
});

test('decompression bombs pushed as pages are refused at once with the reason, memory flat; the honest frame beside them is named; one as a named blob is refused unopened', async () => {
  const s = await server('ts-bomb', 1);
  const t = signTicket({ v: 1, jobId: 'job-bomb', desktopId: 'd', checkoutId: 'c-bomb', direction: 'upload', manifests: [desk.digest], baseManifests: [desk.digest], ...wrapped(master, keys), transferServerId: s.id, maxStreams: 1, expiresAt: new Date(Date.now() + 600_000).toISOString() }, broker.privateKey);
  const CS = desk.manifest.chunkSize;
  const pages = (tag: number, blob: Buffer, baseId: string | null = null) => [pagesFrameHead(tag, baseId, blob.length), blob];
  const honest = randomBytes(4096);
  const body = Buffer.concat([
    // ≈ 8 KiB asking for 256 MiB (measured before the fix: RSS 51 → 571 MiB, 8.4 s), without a size, with it, and lying about it.
    ...pages(0, rawPagesBlob(keys, rleBomb({ blocks: 2048 }))),
    ...pages(1, rawPagesBlob(keys, rleBomb({ blocks: 2048, declare: 'true' }))),
    ...pages(2, rawPagesBlob(keys, rleBomb({ blocks: 2048, declare: 4096 }), ids[0]), ids[0]),
    // A frame near the size limit: ≈ 1 M blocks, ≈ 128 GiB if decompressed whole.
    ...pages(3, rawPagesBlob(keys, rleBomb({ blocks: 1_000_000 }))),
    ...pages(4, sealPages(keys, null, CS, [{ offset: 0, bytes: honest }])),
    endFrame(),
  ]);
  const rss0 = process.memoryUsage().rss;
  const t0 = performance.now();
  const agent = pinnedAgent(s.fingerprint);
  const res = await request(`${s.url}/v1/chunks/push`, { method: 'POST', dispatcher: agent, headers: { authorization: `Ticket ${t}`, 'content-type': 'application/octet-stream' }, body });
  const answer = (await res.body.json()) as { rejected: { tag: number; reason: string; code: string }[]; named: { tag: number; id: string | null }[] };
  // A bomb in a named blob frame (the retired push of chunks under the sender's IDs) is refused
  // with its stream before anything is opened: no chunk blob a sender sends is ever decompressed.
  const asBlob = await request(`${s.url}/v1/chunks/push`, { method: 'POST', dispatcher: agent, headers: { authorization: `Ticket ${t}`, 'content-type': 'application/octet-stream' }, body: Buffer.concat([blobFrame(ids[1]!, rawChunkBlob(keys, ids[1]!, rleBomb({ blocks: 2048, declare: 'true' }))), endFrame()]) });
  assert.deepEqual([asBlob.statusCode, ((await asBlob.body.json()) as { error: string }).error], [400, 'bad-frame']);
  await agent.close();
  const ms = performance.now() - t0;
  const grewMiB = (process.memoryUsage().rss - rss0) / 2 ** 20;
  assert.equal(res.statusCode, 200);
  const reason = (tag: number) => answer.rejected.find((r) => r.tag === tag)?.reason ?? 'not rejected';
  assert.match(reason(0), /blob rejected \(decompress\): the zstd frame does not declare its size/);
  assert.match(reason(1), /blob rejected \(too-large\): the zstd frame declares 268435456 bytes/);
  assert.match(reason(2), /blob rejected \(decompress\)/);
  assert.match(reason(3), /does not declare its size/);
  assert.ok(answer.rejected.every((r) => r.code === 'invalid'));
  const named = answer.named.find((n) => n.tag === 4);
  assert.equal(named?.id, computeChunkId(keys.idKey, Buffer.concat([honest, Buffer.alloc(CS - 4096)])), 'the honest frame is rebuilt and named');
  assert.ok(ms < 3000, `answered in ${ms.toFixed(0)} ms`);
  assert.ok(grewMiB < 96, `RSS grew by ${grewMiB.toFixed(0)} MiB`);
});

test('push route fuzz (seeded): hostile frames, bombs and cut streams get 200 with refusals or 400, never 500; the server stays up, memory bounded', async () => {
  const s = await server('ts-fuzz', 1);
  const t = signTicket({ v: 1, jobId: 'job-fuzz', desktopId: 'd', checkoutId: 'c-fuzz', direction: 'upload', manifests: [desk.digest], baseManifests: [desk.digest], ...wrapped(master, keys), transferServerId: s.id, maxStreams: 1, expiresAt: new Date(Date.now() + 600_000).toISOString() }, broker.privateKey);
  const r = seeded(Number(process.env.CARRYON_FUZZ_SEED ?? 22));
  const bomb = () => rleBomb({ blocks: r.pick([33, 2048, 200_000]), declare: r.pick(['none', 'true', 65536]) as 'none' });
  const frame = (): Buffer[] => {
    const id = r.pick(ids);
    switch (r.int(6)) {
      case 0: return [blobFrame(id, rawChunkBlob(keys, id, bomb()))];
      case 1: {
        const blob = rawPagesBlob(keys, bomb(), r.int(2) ? id : null);
        return [pagesFrameHead(r.int(100), blob[0] === 2 && r.int(2) ? id : null, blob.length), blob];
      }
      // Type 3: the sender-named delta of the retired named push.
      case 2: return [encodeFrame(3, id, Buffer.concat([Buffer.from(r.pick(ids), 'hex'), r.bytes(r.int(300))]))];
      case 3: return [encodeFrame(FRAME_PAGES, null, r.bytes(r.int(8)))];
      case 4: return [encodeFrame(r.pick([7, 255, 2]), id, r.bytes(r.int(64)))];
      default: {
        const junk = r.bytes(r.int(4096));
        return [pagesFrameHead(r.int(100), r.int(2) ? id : null, junk.length), junk];
      }
    }
  };
  const rss0 = process.memoryUsage().rss;
  const statuses = new Map<number, number>();
  // One connection pool for all, as a client has: a push refused before its body's end must not
  // leave its connection to the next request (one waited ≈ 73 s for a reset before the fix).
  const agent = pinnedAgent(s.fingerprint);
  try {
    for (let i = 0; i < 30; i++) {
      const parts = Array.from({ length: r.int(5) + 1 }, frame).flat();
      if (r.int(4)) parts.push(endFrame());
      let body = Buffer.concat(parts);
      if (!r.int(5)) body = body.subarray(0, r.int(body.length));
      const t0 = performance.now();
      const res = await request(`${s.url}/v1/chunks/push`, { method: 'POST', dispatcher: agent, headers: { authorization: `Ticket ${t}`, 'content-type': 'application/octet-stream' }, body, headersTimeout: 10_000 });
      const answer = (await res.body.json()) as { error?: string };
      statuses.set(res.statusCode, (statuses.get(res.statusCode) ?? 0) + 1);
      assert.ok(res.statusCode === 200 || (res.statusCode === 400 && answer.error === 'bad-frame'), `request ${i}: ${res.statusCode} ${JSON.stringify(answer)}`);
      assert.ok(performance.now() - t0 < 5000, `request ${i} took ${(performance.now() - t0).toFixed(0)} ms`);
    }
  } finally {
    await agent.close();
  }
  assert.ok((statuses.get(200) ?? 0) > 0 && (statuses.get(400) ?? 0) > 0, JSON.stringify([...statuses]));
  assert.ok(process.memoryUsage().rss - rss0 < 128 * 2 ** 20, 'memory bounded');
  const alive = pinnedAgent(s.fingerprint);
  const last = await request(`${s.url}/v1/chunks/push`, { method: 'POST', dispatcher: alive, headers: { authorization: `Ticket ${t}`, 'content-type': 'application/octet-stream' }, body: endFrame() });
  assert.deepEqual([last.statusCode, await last.body.json()], [200, { stored: 0, duplicate: 0, rejected: [], named: [] }], 'the server still answers');
  await alive.close();
});

test('expired, forged, foreign and wrong-direction tickets are refused; out-of-scope chunks are not served', async () => {
  const s = await server('ts-x', 1);
  const base = { v: 1 as const, jobId: 'j', desktopId: 'd', checkoutId: 'c', direction: 'download' as const, manifests: [desk.digest], ...wrapped(master, keys), transferServerId: s.id, maxStreams: 1, expiresAt: new Date(Date.now() + 600_000).toISOString() };
  const agent = pinnedAgent(s.fingerprint);
  const call = async (ticket: string, path = '/v1/chunks/fetch', body: unknown = { ids: ids.slice(0, 2) }) => {
    const res = await request(`${s.url}${path}`, { method: 'POST', dispatcher: agent, headers: { authorization: `Ticket ${ticket}`, 'content-type': 'application/json' }, body: JSON.stringify(body) });
    const bytes = Buffer.from(await res.body.arrayBuffer());
    return { status: res.statusCode, body: (res.statusCode === 200 ? {} : JSON.parse(bytes.toString())) as { error: string } };
  };
  assert.equal((await call(signTicket(base, broker.privateKey))).status, 200);
  const expired = await call(signTicket({ ...base, expiresAt: new Date(Date.now() - 1000).toISOString() }, broker.privateKey));
  assert.deepEqual([expired.status, expired.body.error], [401, 'ticket-expired']);
  const forged = await call(signTicket(base, generateSigningKey().privateKey));
  assert.deepEqual([forged.status, forged.body.error], [401, 'ticket-signature']);
  const foreign = await call(signTicket({ ...base, transferServerId: 'other' }, broker.privateKey));
  assert.deepEqual([foreign.status, foreign.body.error], [403, 'ticket-wrong-server']);
  const push = await call(signTicket(base, broker.privateKey), '/v1/chunks/push', {});
  assert.deepEqual([push.status, push.body.error], [403, 'wrong-direction']);
  // Wrong media type is a 415, a body past the limit a 413 (not a 400, not a cut connection).
  const ticket = signTicket(base, broker.privateKey);
  const plain = await request(`${s.url}/v1/chunks/fetch`, { method: 'POST', dispatcher: agent, headers: { authorization: `Ticket ${ticket}`, 'content-type': 'text/plain' }, body: 'ids' });
  assert.deepEqual([plain.statusCode, ((await plain.body.json()) as { error: string }).error], [415, 'unsupported-media-type']);
  const huge = await request(`${s.url}/v1/chunks/fetch`, { method: 'POST', dispatcher: agent, headers: { authorization: `Ticket ${ticket}`, 'content-type': 'application/json' }, body: Buffer.alloc(65 * 1024 * 1024, 0x20) });
  assert.deepEqual([huge.statusCode, ((await huge.body.json()) as { error: string }).error], [413, 'body-too-large']);
  await agent.close();
});

test('remote checkpoint (boot while in flight): tampered blobs are refused and recorded, reads return the true bytes; holes need no fetch', async () => {
  const s = await server('ts-rc', 2, tamperFirst(2));
  const t = signTicket({ v: 1, jobId: 'job-rc', desktopId: 'd', checkoutId: 'c', direction: 'download', manifests: [desk.digest], ...wrapped(master, keys), transferServerId: s.id, maxStreams: 2, expiresAt: new Date(Date.now() + 600_000).toISOString() }, broker.privateKey);
  const session = new TransferSession({ url: s.url, fingerprint: s.fingerprint, ticket: t, maxStreams: 2 });
  const failures: string[] = [];
  const logs: string[] = [];
  const remote = new RemoteCheckpoint({ manifest: desk.manifest, keys, session, log: (l) => logs.push(l), onFailure: (m) => failures.push(m) });
  try {
    const CS = desk.manifest.chunkSize;
    // A random read (demand lane) and a sequential run (which prefetches ahead).
    const expect = async (i: number) => openBlob(keys, ids[i]!, (await desk.store.get(ids[i]!))!);
    assert.ok((await remote.read(7 * CS + 100, 1000)).equals((await expect(7)).subarray(100, 1100)));
    for (let i = 0; i < 6; i++) assert.ok((await remote.read(i * CS, CS)).equals(await expect(i)), `chunk ${i}`);
    assert.equal(failures.length, 2, 'each refused blob is recorded');
    assert.match(failures[0]!, /failed authentication/);
    assert.ok(logs.some((l) => /failed authentication/.test(l)), 'and logged');
    await assert.rejects(remote.write(), /read-only/);
  } finally {
    await remote.close();
    await session.close();
  }
  const holey = createManifest(desk.manifest.chunkSize, 2 * desk.manifest.chunkSize, [null, null]);
  const idle = new RemoteCheckpoint({ manifest: holey, keys, session: new TransferSession({ url: 'https://127.0.0.1:1', fingerprint: s.fingerprint, ticket: t, maxStreams: 1 }), log: () => undefined });
  assert.ok((await idle.read(0, holey.diskSize)).equals(Buffer.alloc(holey.diskSize)), 'holes read as zeros without the network');
  await idle.close();
});

test('fetch answers every requested id in order, across read-ahead windows, with repeats and refusals', async () => {
  const s = await server('ts-order', 1);
  const ticket = signTicket({ v: 1, jobId: 'jo', desktopId: 'd', checkoutId: 'c', direction: 'download', manifests: [desk.digest], ...wrapped(master, keys), transferServerId: s.id, maxStreams: 1, expiresAt: new Date(Date.now() + 600_000).toISOString() }, broker.privateKey);
  const asked = [...ids, ids[0]!, ids[35]!, 'e'.repeat(64), ...ids.slice(0, 5), ids[39]!];
  const agent = pinnedAgent(s.fingerprint);
  const res = await request(`${s.url}/v1/chunks/fetch`, { method: 'POST', dispatcher: agent, headers: { authorization: `Ticket ${ticket}`, 'content-type': 'application/json' }, body: JSON.stringify({ ids: asked }) });
  const decoder = new FrameDecoder();
  const frames = [];
  for await (const piece of res.body) frames.push(...decoder.push(piece as Buffer));
  await agent.close();
  const answers = frames.filter((f) => f.type === FRAME_BLOB || f.type === FRAME_ERROR);
  assert.equal(answers.length, frames.length - 1);
  assert.deepEqual(answers.map((f) => f.id), asked);
  for (const f of answers) {
    if (f.id === 'e'.repeat(64)) assert.equal(f.type, FRAME_ERROR);
    else {
      assert.equal(f.type, FRAME_BLOB);
      if (f.type === FRAME_BLOB) openBlob(keys, f.id, f.payload);
    }
  }
});
