import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, test } from 'node:test';
import { request } from 'undici';
import { sealChunk } from '../../src/core/chunks/blob.js';
import { sealPages, type Piece } from '../../src/core/chunks/delta.js';
import { generateLineageKeys } from '../../src/core/keys.js';
import { createManifest, encodeManifest, manifestDigest } from '../../src/core/chunks/manifest.js';
import { generateSigningKey } from '../../src/core/signing.js';
import { signTicket, type TicketPayload } from '../../src/core/tokens/ticket.js';
import { pinnedAgent } from '../../src/net/pinned-agent.js';
import { blobFrame, endFrame, FRAME_BLOB, FRAME_END, FRAME_ERROR, FrameDecoder, pagesFrameHead } from '../../src/core/chunks/frames.js';
import { startTransferServer, type TransferServer } from '../../src/transfer/server.js';
import { makeDesktopStore, wrapped } from './helpers.js';

const dir = mkdtempSync(join(tmpdir(), 'carryon-transfer-trust-'));
const servers: TransferServer[] = [];
after(async () => {
  await Promise.all(servers.map((s) => s.close()));
  rmSync(dir, { recursive: true, force: true });
});

const keys = generateLineageKeys();
const master = randomBytes(32);
const broker = generateSigningKey();
// One shared store: "ours" is the checkout's desktop, "theirs" another clone of the same lineage.
const ours = await makeDesktopStore(dir, keys, 8);
const oursIds = ours.manifest.chunks.filter((c): c is string => c !== null);
const CS = 64 * 1024;
const theirPlain = randomBytes(CS);
const theirs = sealChunk(keys, theirPlain);
await ours.store.put(theirs.id, theirs.blob);

let clock = Date.now();
const s = await startTransferServer({ id: 'ts-trust', slots: 4, store: ours.store, masterKey: master, brokerPublicKey: broker.publicKey, tlsDir: join(dir, 'tls'), now: () => clock });
servers.push(s);
const agent = pinnedAgent(s.fingerprint);
after(() => agent.close());

function ticket(p: Partial<TicketPayload> = {}): string {
  return signTicket({
    v: 1, jobId: 'job', desktopId: 'd', checkoutId: 'c', direction: 'download', manifests: [ours.digest], ...wrapped(master, keys),
    transferServerId: s.id, maxStreams: 4, expiresAt: new Date(clock + 600_000).toISOString(), ...p,
  }, broker.privateKey);
}

async function call(path: string, t: string, body: Buffer | string, type = 'application/json') {
  const res = await request(`${s.url}${path}`, { method: 'POST', dispatcher: agent, headers: { authorization: `Ticket ${t}`, 'content-type': type }, body });
  const text = await res.body.text();
  return { status: res.statusCode, type: String(res.headers['content-type']), body: JSON.parse(text) as Record<string, unknown> };
}

/** An upload ticket for a check-in of this checkout (the checkpoint as its base unless `withBase` is false). */
function uploadTicket(jobId: string, withBase = true, checkoutId = 'c'): string {
  return ticket({ jobId, checkoutId, direction: 'upload', manifests: [ours.digest], ...(withBase ? { baseManifests: [ours.digest] } : {}) });
}

/** A pages frame: `pieces` written over `baseId`'s chunk (null: over zeros), sealed under `k`. */
function pagesFrame(tag: number, baseId: string | null, pieces: Piece[], k = keys): Buffer {
  const blob = sealPages(k, baseId, CS, pieces);
  return Buffer.concat([pagesFrameHead(tag, baseId, blob.length), blob]);
}

const push = (t: string, ...frames: Buffer[]) => call('/v1/chunks/push', t, Buffer.concat([...frames, endFrame()]), 'application/octet-stream');

/** Authorizes `t` (loading its scope) through the fetch route without moving a chunk: status and error code. */
async function probe(t: string, body = '{"ids":[]}'): Promise<{ status: number; error?: string; message?: string }> {
  const res = await request(`${s.url}/v1/chunks/fetch`, { method: 'POST', dispatcher: agent, headers: { authorization: `Ticket ${t}`, 'content-type': 'application/json' }, body });
  const bytes = Buffer.from(await res.body.arrayBuffer());
  if (res.statusCode !== 200) return { status: res.statusCode, ...(JSON.parse(bytes.toString()) as { error: string; message: string }) };
  return { status: 200 };
}

test('item 4: pages bases and duplicate counts are scoped to the checkout\'s checkpoint: no oracle for other clones\' chunks', async () => {
  // Pages naming the other clone's chunk (in the store, not in this checkpoint) as their base are
  // refused exactly as if that chunk did not exist.
  const t = uploadTicket('job-base');
  const r = await push(t, pagesFrame(0, theirs.id, [{ offset: 0, bytes: randomBytes(4096) }]), pagesFrame(1, 'a'.repeat(64), [{ offset: 0, bytes: randomBytes(4096) }]));
  assert.equal(r.status, 200);
  assert.deepEqual((r.body.rejected as { tag: number; code: string }[]).map((x) => [x.tag, x.code]).sort(), [[0, 'base-missing'], [1, 'base-missing']]);

  // Pages rebuilding the other clone's chunk: counted as stored, not as "duplicate" (which would tell).
  const whole: Piece[] = [{ offset: 0, bytes: theirPlain }];
  const dup = await push(uploadTicket('job-dup'), pagesFrame(0, null, whole));
  assert.deepEqual([dup.body.stored, dup.body.duplicate, (dup.body.named as { id: string }[])[0]!.id], [1, 0, theirs.id]);
  // Once this checkout pushed it, a later upload job of it (a check-in killed and begun again) is told it is a duplicate …
  const again = await push(uploadTicket('job-dup-again'), pagesFrame(0, null, whole));
  assert.deepEqual([again.body.stored, again.body.duplicate], [0, 1]);
  // … but not another checkout's.
  const foreign = await push(uploadTicket('job-other-checkout', true, 'c-other'), pagesFrame(0, null, whole));
  assert.deepEqual([foreign.body.stored, foreign.body.duplicate], [1, 0]);

  // A ticket without checkpoint manifests (older broker) takes no base at all, not even its own checkpoint's.
  const nobase = await push(uploadTicket('job-nobase', false), pagesFrame(0, oursIds[1]!, [{ offset: 0, bytes: randomBytes(4096) }]));
  assert.deepEqual((nobase.body.rejected as { code: string }[]).map((x) => x.code), ['base-missing']);
});

test('item 5: per-job scopes, keys and counters are evicted at ticket expiry and at revocation: flat over many jobs', async () => {
  s.sweep();
  s.drainSummaries();
  const base = s.retained();
  const JOBS = 300;
  for (let i = 0; i < JOBS; i++) {
    const t = ticket({ jobId: `soak-${i}`, expiresAt: new Date(clock + 2000).toISOString() });
    assert.equal((await probe(t)).status, 200);
    if (i % 100 === 99) {
      // Tickets of the last 100 jobs expire; the next request sweeps them.
      clock += 3000;
    }
  }
  clock += 3000;
  s.sweep();
  const after = s.retained();
  assert.deepEqual(after, base, 'nothing per job is left once the tickets expired');

  // Job end: the broker's revocation list evicts at once and refuses the job's tickets.
  const t = ticket({ jobId: 'ended' });
  const fetched = await request(`${s.url}/v1/chunks/fetch`, { method: 'POST', dispatcher: agent, headers: { authorization: `Ticket ${t}`, 'content-type': 'application/json' }, body: JSON.stringify({ ids: oursIds.slice(0, 2) }) });
  await fetched.body.arrayBuffer();
  assert.equal(s.retained().scopes, base.scopes + 1);
  s.setRevoked(['ended']);
  assert.equal(s.retained().scopes, base.scopes);
  assert.equal(s.retained().jobCounters, base.jobCounters);
  const refused = await probe(t);
  assert.deepEqual([refused.status, refused.error], [403, 'ticket-revoked']);
  s.setRevoked([]);

  // Each evicted job left one summary of its chunk access for the broker's audit.
  const summaries = s.drainSummaries();
  const ended = summaries.find((x) => x.jobId === 'ended');
  assert.ok(ended && ended.chunksOut === 2 && ended.reason === 'ended', JSON.stringify(ended));
  assert.equal(summaries.filter((x) => x.jobId.startsWith('soak-')).length, 0, 'jobs that moved no chunk leave no summary');
  assert.equal(s.retained().pendingSummaries, 0);
  // A checkout's pushed-chunk sets go an hour after its newest upload ticket.
  assert.ok(s.retained().checkoutSets > 0);
  clock += 2 * 3600_000;
  s.sweep();
  assert.equal(s.retained().checkoutSets, 0);
});

test('items 8 and 10: validation errors are one clear {error, message}; a truncated pack is a 400, not a 500', async () => {
  const t = ticket({ jobId: 'errors' });
  const bad = await probe(t, JSON.stringify({ ids: ['nope'] }));
  assert.equal(bad.status, 400);
  assert.equal(bad.error, 'invalid');
  assert.match(String(bad.message), /^invalid request: ids\.0: not a chunk ID$/);
  const extra = await probe(t, JSON.stringify({ ids: [], more: 1 }));
  assert.deepEqual([extra.status, extra.error], [400, 'invalid']);
  assert.ok(!String(extra.message).startsWith('['), 'not a raw zod issue array');

  const up = uploadTicket('job-trunc');
  const whole = Buffer.concat([pagesFrame(0, oursIds[0]!, [{ offset: 0, bytes: randomBytes(8192) }]), endFrame()]);
  for (const cut of [whole.subarray(0, 20), whole.subarray(0, whole.length - 100), whole.subarray(0, whole.length - 37)]) {
    const r = await call('/v1/chunks/push', up, cut, 'application/octet-stream');
    assert.equal(r.status, 400, JSON.stringify(r.body));
    assert.equal(r.body.error, 'bad-frame');
    assert.match(r.type, /application\/json/);
  }
  const empty = await call('/v1/chunks/push', up, Buffer.alloc(0), 'application/octet-stream');
  assert.deepEqual([empty.status, empty.body.error], [400, 'bad-frame']);
  const json = await call('/v1/chunks/push', up, JSON.stringify({}));
  assert.equal(json.status, 400);
  assert.equal(json.body.error, 'invalid');

  // Unknown manifest (missing thing) is 404; a corrupt stored manifest is the server's fault: 500.
  const unknown = await probe(ticket({ jobId: 'unknown', manifests: ['b'.repeat(64)] }));
  assert.deepEqual([unknown.status, unknown.error], [404, 'unknown-manifest']);
  await ours.store.putManifest('c'.repeat(64), Buffer.from('not a manifest'));
  const corrupt = await probe(ticket({ jobId: 'corrupt', manifests: ['c'.repeat(64)] }));
  assert.deepEqual([corrupt.status, corrupt.error], [500, 'store-corrupt']);
});

test('existing guards: pushed pages are authenticated, a push takes no chunk named by its sender, fetches stay inside the ticket\'s manifests', async () => {
  const written = randomBytes(8192);
  const forged = pagesFrame(0, oursIds[2]!, [{ offset: 4096, bytes: written }]);
  forged[forged.length - 3]! ^= 1;
  // Sealed under another lineage's keys: no key holder of this one made it.
  const otherLineage = pagesFrame(1, oursIds[2]!, [{ offset: 4096, bytes: written }], generateLineageKeys());
  const before = s.stats.blobsRejected;
  const r = await push(uploadTicket('job-guards'), forged, otherLineage);
  assert.equal(r.status, 200);
  // Checks run in parallel: the rejections come in no particular order.
  assert.deepEqual((r.body.rejected as { tag: number; reason: string }[]).map((x) => x.tag).sort(), [0, 1]);
  assert.ok((r.body.rejected as { reason: string }[]).every((x) => /GCM tag does not verify/.test(x.reason)), JSON.stringify(r.body.rejected));
  assert.deepEqual([r.body.stored, r.body.duplicate, r.body.named], [0, 0, []]);
  assert.equal(s.stats.blobsRejected, before + 2);

  // The retired named push: a whole blob (type 1) or a sender-named delta (type 3) under an ID the
  // sender chose is no part of a push; the stream is refused and nothing is stored, even when the
  // blob is authentic and the ID one the ticket's manifests reference.
  const fresh = sealChunk(keys, randomBytes(CS));
  const named = await push(uploadTicket('job-named'), blobFrame(fresh.id, fresh.blob));
  assert.deepEqual([named.status, named.body.error], [400, 'bad-frame']);
  assert.match(String(named.body.message), /pages frames only, not type 1/);
  assert.equal(await ours.store.get(fresh.id), null, 'the named blob was not stored');
  const ownId = oursIds[3]!;
  const delta = Buffer.alloc(37 + 32 + 64);
  delta[0] = 3;
  Buffer.from(ownId, 'hex').copy(delta, 1);
  delta.writeUInt32BE(96, 33);
  const deltaPush = await push(uploadTicket('job-delta'), delta);
  assert.deepEqual([deltaPush.status, deltaPush.body.error], [400, 'bad-frame']);
  assert.match(String(deltaPush.body.message), /unknown frame type 3/);

  // Fetch: a chunk in the store but outside the ticket's manifests comes back as an error frame, never as data.
  const res = await request(`${s.url}/v1/chunks/fetch`, { method: 'POST', dispatcher: agent, headers: { authorization: `Ticket ${ticket({ jobId: 'job-fetch' })}`, 'content-type': 'application/json' }, body: JSON.stringify({ ids: [theirs.id, oursIds[0]] }) });
  const frames = new FrameDecoder().push(Buffer.from(await res.body.arrayBuffer()));
  assert.deepEqual(frames.map((f) => f.type), [FRAME_ERROR, FRAME_BLOB, FRAME_END]);
  assert.ok(!frames.some((f) => f.type === FRAME_BLOB && f.id === theirs.id));
});

test('item 10: a truncated pack in the store fails the chunks it holds with a clear reason; the stream goes on', async () => {
  const { openChunkStore } = await import('../../src/store/open-store.js');
  const { readdirSync, truncateSync, statSync } = await import('node:fs');
  const root = join(dir, 'pack-store');
  const store = await openChunkStore(root);
  const chunks = [sealChunk(keys, randomBytes(CS)), sealChunk(keys, randomBytes(CS))];
  for (const c of chunks) await store.put(c.id, c.blob, { defer: true });
  await store.sync();
  const m = createManifest(CS, 2 * CS, chunks.map((c) => c.id));
  await store.putManifest(manifestDigest(m), encodeManifest(m));
  const packs: string[] = [];
  const walk = (d: string) => { for (const e of readdirSync(d, { withFileTypes: true })) e.isDirectory() ? walk(join(d, e.name)) : e.name.endsWith('.pack') && packs.push(join(d, e.name)); };
  walk(root);
  assert.equal(packs.length, 1);
  truncateSync(packs[0]!, statSync(packs[0]!).size - CS / 2); // the second blob is cut
  const ps = await startTransferServer({ id: 'ts-pack', slots: 1, store, masterKey: master, brokerPublicKey: broker.publicKey, tlsDir: join(dir, 'tls-pack') });
  servers.push(ps);
  const a = pinnedAgent(ps.fingerprint);
  try {
    const t = signTicket({ v: 1, jobId: 'pack', desktopId: 'd', checkoutId: 'c', direction: 'download', manifests: [manifestDigest(m)], ...wrapped(master, keys), transferServerId: ps.id, maxStreams: 1, expiresAt: new Date(clock + 600_000).toISOString() }, broker.privateKey);
    const res = await request(`${ps.url}/v1/chunks/fetch`, { method: 'POST', dispatcher: a, headers: { authorization: `Ticket ${t}`, 'content-type': 'application/json' }, body: JSON.stringify({ ids: chunks.map((c) => c.id) }) });
    assert.equal(res.statusCode, 200);
    const frames = new FrameDecoder().push(Buffer.from(await res.body.arrayBuffer()));
    assert.deepEqual(frames.map((f) => f.type), [FRAME_BLOB, FRAME_ERROR, FRAME_END]);
    const err = frames[1] as { message: string };
    assert.match(err.message, /transfer server store error/);
  } finally {
    await a.close();
    await store.close();
  }
});
