import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, test } from 'node:test';
import { request } from 'undici';
import { openBlob, sealChunk } from '../../src/core/blob.js';
import { sealDelta } from '../../src/core/delta.js';
import { generateLineageKeys } from '../../src/core/keys.js';
import { createManifest, encodeManifest, manifestDigest } from '../../src/core/manifest.js';
import { generateSigningKey } from '../../src/core/signing.js';
import { signTicket, type TicketPayload } from '../../src/core/ticket.js';
import { pinnedAgent } from '../../src/net/pinned-agent.js';
import { blobFrame, deltaFrame, endFrame, FRAME_BLOB, FRAME_END, FRAME_ERROR, FrameDecoder } from '../../src/transfer/frames.js';
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

/** An upload ticket for a check-in whose new manifest names `ids` (the user chose them). */
async function uploadTicket(jobId: string, ids: string[], withBase = true): Promise<string> {
  const m = createManifest(CS, ids.length * CS, ids);
  const digest = manifestDigest(m);
  await ours.store.putManifest(digest, encodeManifest(m));
  return ticket({ jobId, direction: 'upload', manifests: [digest], ...(withBase ? { baseManifests: [ours.digest] } : {}) });
}

test('item 4: /missing and delta bases are scoped to the checkout\'s checkpoint: no oracle for other clones\' chunks', async () => {
  const guess = theirs.id; // in the store, but not in this checkout's checkpoint
  const absent = 'a'.repeat(64);
  const t = await uploadTicket('job-oracle', [oursIds[0]!, guess, absent]);
  const missing = await call('/v1/chunks/missing', t, JSON.stringify({ ids: [oursIds[0], guess, absent] }));
  assert.equal(missing.status, 200);
  // Own checkpoint chunk: truthfully present. Guessed chunk of another desktop: "missing", like a truly absent one.
  assert.deepEqual(missing.body.missing, [guess, absent]);

  // A delta naming the other clone's chunk as its base is refused exactly as if that chunk did not exist.
  const next = Buffer.from(theirPlain);
  randomBytes(100).copy(next, 10);
  const sealed = sealChunk(keys, next);
  const t2 = await uploadTicket('job-delta', [sealed.id]);
  const delta = sealDelta(keys, sealed.id, theirs.id, theirPlain, next)!;
  const pushed = await call('/v1/chunks/push', t2, Buffer.concat([deltaFrame(sealed.id, theirs.id, delta), endFrame()]), 'application/octet-stream');
  assert.equal(pushed.status, 200);
  assert.deepEqual((pushed.body.rejected as { code: string }[]).map((r) => r.code), ['base-missing']);

  // Pushing the other clone's chunk whole: counted as stored, not as "duplicate" (which would tell).
  const t3 = await uploadTicket('job-dup', [theirs.id]);
  const dup = await call('/v1/chunks/push', t3, Buffer.concat([blobFrame(theirs.id, theirs.blob), endFrame()]), 'application/octet-stream');
  assert.deepEqual([dup.body.stored, dup.body.duplicate], [1, 0]);
  // Once this job pushed it, asking again says present (a resumed upload does not resend it).
  assert.deepEqual((await call('/v1/chunks/missing', t3, JSON.stringify({ ids: [theirs.id] }))).body.missing, []);
  // So does a later upload job of the same checkout (a check-in killed and begun again) …
  const again = await uploadTicket('job-dup-again', [theirs.id]);
  assert.deepEqual((await call('/v1/chunks/missing', again, JSON.stringify({ ids: [theirs.id] }))).body.missing, []);
  // … but not another checkout's.
  const m = createManifest(CS, CS, [theirs.id]);
  const foreign = ticket({ jobId: 'job-other-checkout', checkoutId: 'c-other', direction: 'upload', manifests: [manifestDigest(m)], baseManifests: [ours.digest] });
  assert.deepEqual((await call('/v1/chunks/missing', foreign, JSON.stringify({ ids: [theirs.id] }))).body.missing, [theirs.id]);

  // A ticket without checkpoint manifests (older broker) tells nothing at all.
  const t4 = await uploadTicket('job-nobase', [oursIds[1]!], false);
  assert.deepEqual((await call('/v1/chunks/missing', t4, JSON.stringify({ ids: [oursIds[1]] }))).body.missing, [oursIds[1]]);
});

test('item 5: per-job scopes, keys and counters are evicted at ticket expiry and at revocation: flat over many jobs', async () => {
  s.sweep();
  s.drainSummaries();
  const base = s.retained();
  const JOBS = 300;
  for (let i = 0; i < JOBS; i++) {
    const t = ticket({ jobId: `soak-${i}`, expiresAt: new Date(clock + 2000).toISOString() });
    const r = await call('/v1/chunks/missing', t, JSON.stringify({ ids: [oursIds[i % oursIds.length]] }));
    assert.equal(r.status, 200);
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
  const refused = await call('/v1/chunks/missing', t, JSON.stringify({ ids: [oursIds[0]] }));
  assert.deepEqual([refused.status, refused.body.error], [403, 'ticket-revoked']);
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
  const bad = await call('/v1/chunks/missing', t, JSON.stringify({ ids: ['nope'] }));
  assert.equal(bad.status, 400);
  assert.equal(bad.body.error, 'invalid');
  assert.match(String(bad.body.message), /^invalid request: ids\.0: not a chunk ID$/);
  const extra = await call('/v1/chunks/missing', t, JSON.stringify({ ids: [], more: 1 }));
  assert.deepEqual([extra.status, extra.body.error], [400, 'invalid']);
  assert.ok(!String(extra.body.message).startsWith('['), 'not a raw zod issue array');

  const up = await uploadTicket('job-trunc', oursIds.slice(0, 2));
  const whole = Buffer.concat([blobFrame(oursIds[0]!, (await ours.store.get(oursIds[0]!))!), endFrame()]);
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
  const unknown = await call('/v1/chunks/missing', ticket({ jobId: 'unknown', manifests: ['b'.repeat(64)] }), JSON.stringify({ ids: [] }));
  assert.deepEqual([unknown.status, unknown.body.error], [404, 'unknown-manifest']);
  await ours.store.putManifest('c'.repeat(64), Buffer.from('not a manifest'));
  const corrupt = await call('/v1/chunks/missing', ticket({ jobId: 'corrupt', manifests: ['c'.repeat(64)] }), JSON.stringify({ ids: [] }));
  assert.deepEqual([corrupt.status, corrupt.body.error], [500, 'store-corrupt']);
  void openBlob;
});

test('existing guards: pushed blobs are authenticated, pushes and fetches stay inside the ticket\'s manifests', async () => {
  // A new chunk the user's check-in manifest names, and one it does not.
  const inScope = sealChunk(keys, randomBytes(CS));
  const outScope = sealChunk(keys, randomBytes(CS));
  const t = await uploadTicket('job-guards', [inScope.id]);
  const forged = Buffer.from(inScope.blob);
  forged[forged.length - 3]! ^= 1;
  const r = await call('/v1/chunks/push', t, Buffer.concat([blobFrame(inScope.id, forged), blobFrame(outScope.id, outScope.blob), endFrame()]), 'application/octet-stream');
  assert.equal(r.status, 200);
  // Checks run in parallel: the rejections come in no particular order.
  assert.deepEqual((r.body.rejected as { id: string }[]).map((x) => x.id).sort(), [inScope.id, outScope.id].sort());
  assert.deepEqual([r.body.stored, r.body.duplicate], [0, 0]);
  assert.equal(await ours.store.get(inScope.id), null, 'the forged blob was not stored');
  assert.equal(await ours.store.get(outScope.id), null, 'the out-of-scope blob was not stored');
  // A wrongly keyed blob (another lineage) under an in-scope ID: refused too.
  const other = sealChunk(generateLineageKeys(), randomBytes(CS));
  const t2 = await uploadTicket('job-guards-2', [other.id]);
  const r2 = await call('/v1/chunks/push', t2, Buffer.concat([blobFrame(other.id, other.blob), endFrame()]), 'application/octet-stream');
  assert.equal((r2.body.rejected as unknown[]).length, 1);

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
