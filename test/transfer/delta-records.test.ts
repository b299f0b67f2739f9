import assert from 'node:assert/strict';
import { randomBytes, randomInt } from 'node:crypto';
import { mkdirSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, test } from 'node:test';
import { request } from 'undici';
import { openBlob, sealChunk } from '../../src/core/chunks/blob.js';
import { sealPages, type Piece } from '../../src/core/chunks/delta.js';
import { deltaRecordBase, deltaRecordId, encodeDeltaChain, makeDeltaRecord, openDeltaChain, openDeltaRecord, ZERO_BASE } from '../../src/core/chunks/delta-record.js';
import { generateLineageKeys } from '../../src/core/keys.js';
import { createManifest, encodeManifest, manifestDigest, type Manifest } from '../../src/core/chunks/manifest.js';
import { generateSigningKey } from '../../src/core/signing.js';
import { signTicket, type TicketPayload } from '../../src/core/tokens/ticket.js';
import { pinnedAgent } from '../../src/net/pinned-agent.js';
import { endFrame, FRAME_BLOB, FRAME_DELTA, FRAME_DELTA_CHAIN, FrameDecoder, pagesFrameHead } from '../../src/core/chunks/frames.js';
import { startTransferServer, type TransferServer } from '../../src/transfer/server.js';
import { TransferSession } from '../../src/transfer-client/client.js';
import { fillDirect, type BaseSink } from '../../src/live/fill/fill-direct.js';
import { makeDesktopStore, wrapped } from './helpers.js';
import { DeltaKeeper } from '../../src/transfer/delta-keeper.js';
import { FsChunkStore } from '../../src/store/fs-chunk-store.js';

const dir = mkdtempSync(join(tmpdir(), 'carryon-delta-records-'));
const servers: TransferServer[] = [];
after(async () => {
  await Promise.all(servers.map((s) => s.close()));
  rmSync(dir, { recursive: true, force: true });
});

const keys = generateLineageKeys();
const CS = 64 * 1024;
const WORDS = ['desktop', 'laptop', 'offline', 'check', 'chunk', 'the', 'a', 'of', 'server', 'lease', 'policy', 'user', 'pages', 'zero', 'qemu'];
/** `n` bytes of text-like data (words of a small vocabulary): what zstd's levels tell apart. */
function text(n: number): Buffer {
  let s = '';
  while (s.length < n) s += `${WORDS[randomInt(WORDS.length)]}${randomInt(8) === 0 ? '\n' : ' '}`;
  return Buffer.from(s.slice(0, n));
}

test('a delta record opens only for its pair (X → Y) and keys; its MAC and its pages are both checked', () => {
  const x = sealChunk(keys, randomBytes(CS));
  const pieces: Piece[] = [{ offset: 4096, bytes: randomBytes(4096) }, { offset: 40960, bytes: randomBytes(8192) }];
  const pages = sealPages(keys, x.id, CS, pieces);
  const y = sealChunk(keys, randomBytes(CS)).id; // the pair the server named
  const record = makeDeltaRecord(keys, x.id, y, pages);
  assert.equal(deltaRecordBase(record), x.id);
  const opened = openDeltaRecord(keys, x.id, y, record);
  assert.equal(opened.length, CS);
  assert.deepEqual(opened.pieces.map((p) => [p.offset, Buffer.from(p.bytes).toString('hex')]), pieces.map((p) => [p.offset, Buffer.from(p.bytes).toString('hex')]));
  assert.notEqual(deltaRecordId(y), y, 'a record is never stored under a chunk ID');
  const refused = (fn: () => unknown, why: RegExp) => assert.throws(fn, (e: Error) => why.test(e.message));
  // Another Y (the store pairing a record with another chunk), another base, other keys.
  refused(() => openDeltaRecord(keys, x.id, x.id, record), /MAC does not verify/);
  refused(() => openDeltaRecord(keys, y, y, record), /against another chunk/);
  refused(() => openDeltaRecord(generateLineageKeys(), x.id, y, record), /MAC does not verify/);
  // A flipped byte in the MAC, in the pages' ciphertext (GCM), a cut record, a record of another version.
  for (const at of [40, record.length - 100]) {
    const bad = Buffer.from(record);
    bad[at]! ^= 1;
    refused(() => openDeltaRecord(keys, x.id, y, bad), at === 40 ? /MAC does not verify/ : /GCM tag does not verify/);
  }
  refused(() => openDeltaRecord(keys, x.id, y, record.subarray(0, 60)), /delta record of 60 bytes/);
  const v2 = Buffer.from(record);
  v2[0] = 2;
  refused(() => openDeltaRecord(keys, x.id, y, v2), /version 2/);
  // A blob of pages another base (the MAC binds header and tag; GCM the base): a record of the right pair but the wrong pages fails.
  const other = makeDeltaRecord(keys, x.id, y, sealPages(keys, y, CS, pieces));
  refused(() => openDeltaRecord(keys, x.id, y, other), /GCM tag does not verify/);
});

test('a chain of records opens only as the links it names, from the base held to the chunk wanted; later pages win', () => {
  const x = sealChunk(keys, randomBytes(CS)).id;
  const y1 = sealChunk(keys, randomBytes(CS)).id;
  const y2 = sealChunk(keys, randomBytes(CS)).id;
  const a = randomBytes(8192);
  const b = randomBytes(4096);
  const r1 = makeDeltaRecord(keys, x, y1, sealPages(keys, x, CS, [{ offset: 4096, bytes: a }]));
  const r2 = makeDeltaRecord(keys, y1, y2, sealPages(keys, y1, CS, [{ offset: 8192, bytes: b }, { offset: CS - 4096, bytes: b }]));
  const chain = encodeDeltaChain([{ newId: y1, record: r1 }, { newId: y2, record: r2 }]);
  const { pieces } = openDeltaChain(keys, x, y2, chain);
  assert.deepEqual(pieces.map((p) => [p.offset, p.bytes.length]), [[4096, 8192], [CS - 4096, 4096]]);
  assert.ok(Buffer.from(pieces[0]!.bytes).equals(Buffer.concat([a.subarray(0, 4096), b])), 'the later page over the earlier');
  const refused = (fn: () => unknown, why: RegExp) => assert.throws(fn, (e: Error) => why.test(e.message));
  refused(() => openDeltaChain(keys, y1, y2, chain), /against another chunk/);
  refused(() => openDeltaChain(keys, x, y1, chain), /ends at another chunk/);
  refused(() => openDeltaChain(keys, x, y2, encodeDeltaChain([{ newId: y2, record: r2 }, { newId: y1, record: r1 }])), /against another chunk/);
  // A link that names another chunk than its record was made for: its MAC says no.
  refused(() => openDeltaChain(keys, x, y2, encodeDeltaChain([{ newId: x, record: r1 }, { newId: y2, record: r2 }])), /MAC does not verify/);
  refused(() => openDeltaChain(keys, x, y2, chain.subarray(0, chain.length - 1)), /cut short/);
});

test('a push keeps a record of each chunk it made from a base; a fetch naming that base gets the pages, any other gets the chunk; a bad record is fetched whole', async () => {
  const master = randomBytes(32);
  const broker = generateSigningKey();
  const ours = await makeDesktopStore(dir, keys, 4);
  const [x0, x1] = ours.manifest.chunks as string[];
  let tamper = false;
  const s = await startTransferServer({
    id: 'ts-delta', slots: 4, store: ours.store, masterKey: master, brokerPublicKey: broker.publicKey, tlsDir: join(dir, 'tls'),
    // Delta records only (version 1; chunk blobs are version 2).
    tamper: (_id, blob) => (tamper && deltaRecordBase(blob) !== null ? Buffer.from(blob).fill(7, blob.length - 20) : blob),
  });
  servers.push(s);
  const agent = pinnedAgent(s.fingerprint);
  after(() => agent.close());
  const ticket = (p: Partial<TicketPayload>) => signTicket({
    v: 1, jobId: 'job', desktopId: 'd', checkoutId: 'c', direction: 'download', manifests: [ours.digest], ...wrapped(master, keys),
    transferServerId: s.id, maxStreams: 4, expiresAt: new Date(Date.now() + 600_000).toISOString(), ...p,
  }, broker.privateKey);
  const post = async (path: string, t: string, body: Buffer | string, type = 'application/json') => {
    const res = await request(`${s.url}${path}`, { method: 'POST', dispatcher: agent, headers: { authorization: `Ticket ${t}`, 'content-type': type }, body });
    return { status: res.statusCode, bytes: Buffer.from(await res.body.arrayBuffer()) };
  };

  // A check-in: one page of chunk 0 (kept as a record), chunk 1 rewritten whole (no record: it would save nothing),
  // and four pages of text written where chunk 2 was a hole (kept against zeros: the pages' zstd level 3 beats the chunk's level 1).
  const page: Piece = { offset: 8192, bytes: randomBytes(4096) };
  const frames = [[0, x0!, [page]], [1, x1!, [{ offset: 0, bytes: randomBytes(CS) }]], [2, null, [{ offset: 4096, bytes: text(16384) }]]] as const;
  const body = Buffer.concat([...frames.map(([tag, base, pieces]) => {
    const blob = sealPages(keys, base, CS, pieces);
    return Buffer.concat([pagesFrameHead(tag, base, blob.length), blob]);
  }), endFrame()]);
  const pushed = await post('/v1/chunks/push', ticket({ jobId: 'up', direction: 'upload', baseManifests: [ours.digest] }), body, 'application/octet-stream');
  assert.equal(pushed.status, 200, pushed.bytes.toString());
  const named = (JSON.parse(pushed.bytes.toString()) as { named: { tag: number; id: string }[] }).named;
  const y0 = named.find((n) => n.tag === 0)!.id;
  const y1 = named.find((n) => n.tag === 1)!.id;
  const y2 = named.find((n) => n.tag === 2)!.id;
  // The push answered before its records were written (they are a cache); fetches found them meanwhile (below, in the e2e tests).
  await s.deltasSettled();
  assert.ok(await ours.store.get(deltaRecordId(y0)), 'chunk 0 has its record');
  assert.equal(await ours.store.get(deltaRecordId(y1)), null, 'a whole rewrite has none');
  assert.equal(deltaRecordBase((await ours.store.get(deltaRecordId(y2)))!), ZERO_BASE, 'pages over a hole are kept against zeros');

  // The snapshot the check-in made.
  const next: Manifest = createManifest(CS, 4 * CS, [y0, y1, y2, ours.manifest.chunks[3]!]);
  const digest = manifestDigest(next);
  await ours.store.putManifest(digest, encodeManifest(next));
  const down = ticket({ jobId: 'down', manifests: [digest] });
  const fetchFrames = async (b: unknown) => {
    const r = await post('/v1/chunks/fetch', down, JSON.stringify(b));
    assert.equal(r.status, 200, r.bytes.toString());
    const dec = new FrameDecoder();
    return dec.push(r.bytes).filter((f) => f.type === FRAME_BLOB || f.type === FRAME_DELTA || f.type === FRAME_DELTA_CHAIN).map((f) => [f.type, (f as { id: string }).id]);
  };
  assert.deepEqual(await fetchFrames({ ids: [y0, y1], have: [x0, x1] }), [[FRAME_DELTA, y0], [FRAME_BLOB, y1]]);
  assert.deepEqual(await fetchFrames({ ids: [y0, y1] }), [[FRAME_BLOB, y0], [FRAME_BLOB, y1]], 'no base named: the chunks');
  assert.deepEqual(await fetchFrames({ ids: [y0], have: [x1] }), [[FRAME_BLOB, y0]], 'another base: the chunk');
  assert.deepEqual(await fetchFrames({ ids: [y0], have: [null] }), [[FRAME_BLOB, y0]]);
  assert.deepEqual(await fetchFrames({ ids: [y2], have: [ZERO_BASE] }), [[FRAME_DELTA, y2]], 'a hole here: the pages over zeros');
  const mismatch = await post('/v1/chunks/fetch', down, JSON.stringify({ ids: [y0, y1], have: [x0] }));
  assert.equal(mismatch.status, 400, 'have must match ids one to one');

  // The laptop's side: a base holding the old chunks at 0 and 1 gets chunk 0's page written over it, chunk 1 whole.
  const plain = [y0, y1, y2].map(async (y) => openBlob(keys, y, (await ours.store.get(y))!));
  const plains = await Promise.all(plain);
  const fill = async (label: string, chunks = [y0, y1, y2, null], t = down) => {
    const writes: string[] = [];
    const sink: BaseSink = {
      write: async (index, p) => void writes.push(`whole ${index} ${p.equals(plains[index]!)}`),
      // Each piece must be the new chunk's bytes at its offset.
      writePieces: async (index, pieces) => void writes.push(`pages ${index} ${pieces.map((p) => `${p.offset}+${p.bytes.length}${Buffer.from(p.bytes).equals(plains[index]!.subarray(p.offset, p.offset + p.bytes.length)) ? '' : ' WRONG'}`).join(',')}`),
      persist: async () => undefined,
      close: async () => undefined,
    };
    const d = join(dir, label);
    mkdirSync(d);
    const session = new TransferSession({ url: s.url, fingerprint: s.fingerprint, ticket: t, maxStreams: 1 });
    try {
      const onlyChanged = { ...next, chunks };
      const r = await fillDirect({ disks: [{ disk: { base: onlyChanged }, dir: d, sink, bases: new Map([[0, x0!], [1, x1!], [2, ZERO_BASE]]) }], session, keys });
      return { writes: writes.sort(), ...r };
    } finally {
      await session.close();
    }
  };
  const good = await fill('good');
  assert.deepEqual(good.writes, ['pages 0 8192+4096', 'whole 1 true', 'whole 2 true']);
  assert.ok(good.bytesMoved < CS + 4096 + 4096 + 1024, `${good.bytesMoved} bytes: a page, four pages of text and one chunk`);

  // A second check-in, from a check-out of that snapshot: two pages of chunk 0 again (one over the page the first wrote).
  const again = sealPages(keys, y0, CS, [{ offset: 8192, bytes: randomBytes(4096) }, { offset: 32768, bytes: randomBytes(4096) }]);
  const second = await post('/v1/chunks/push', ticket({ jobId: 'up2', direction: 'upload', manifests: [digest], baseManifests: [digest] }), Buffer.concat([pagesFrameHead(0, y0, again.length), again, endFrame()]), 'application/octet-stream');
  assert.equal(second.status, 200, second.bytes.toString());
  const z0 = (JSON.parse(second.bytes.toString()) as { named: { id: string }[] }).named[0]!.id;
  const later: Manifest = createManifest(CS, 4 * CS, [z0, y1, y2, ours.manifest.chunks[3]!]);
  await ours.store.putManifest(manifestDigest(later), encodeManifest(later));
  const down2 = ticket({ jobId: 'down2', manifests: [manifestDigest(later)] });
  const typesFor = async (have: string) => new FrameDecoder().push((await post('/v1/chunks/fetch', down2, JSON.stringify({ ids: [z0], have: [have] }))).bytes).filter((f) => f.type !== 0).map((f) => f.type);
  assert.deepEqual(await typesFor(x0!), [FRAME_DELTA_CHAIN], 'a copy two check-ins back gets the chain');
  assert.deepEqual(await typesFor(y0), [FRAME_DELTA], 'one back, the last record');
  assert.deepEqual(await typesFor(x1!), [FRAME_BLOB], 'no chain leads from another chunk');
  // A copy parked two check-ins back: both records' pages, the later over the earlier, written as one set.
  plains[0] = openBlob(keys, z0, (await ours.store.get(z0))!);
  const chained = await fill('chain', [z0, null, null, null], down2);
  assert.deepEqual(chained.writes, ['pages 0 8192+4096,32768+4096']);
  assert.ok(chained.bytesMoved < 3 * 4096 + 1024, `${chained.bytesMoved} bytes: three pages, not the chunk`);
  plains[0] = openBlob(keys, y0, (await ours.store.get(y0))!);

  // A record damaged on its way (or in the store): refused, and the chunk asked for again whole.
  tamper = true;
  const bad = await fill('bad');
  assert.deepEqual(bad.writes, ['whole 0 true', 'whole 1 true', 'whole 2 true']);
});

test('the delta keeper serves a record until it is written, writes it once pushes are quiet, and holds no more than its bound', async () => {
  const store = await FsChunkStore.open(join(dir, 'keeper-store'));
  const keeper = new DeltaKeeper(store, 50, 6000);
  const x = sealChunk(keys, randomBytes(CS)).id;
  const y = sealChunk(keys, randomBytes(CS)).id;
  const pages = sealPages(keys, x, CS, [{ offset: 0, bytes: randomBytes(4096) }]);
  assert.equal(keeper.hold(keys, x, y, pages), true);
  assert.equal(keeper.hold(keys, x, sealChunk(keys, randomBytes(CS)).id, pages), false, 'past its bound the push stores its records itself');
  const record = keeper.get(deltaRecordId(y))!;
  assert.equal(openDeltaRecord(keys, x, y, record).pieces.length, 1, 'fetchable before it is in the store');
  assert.equal(await store.get(deltaRecordId(y)), null);
  keeper.flushSoon();
  assert.equal(await store.get(deltaRecordId(y)), null, 'not while pushes may still come');
  await new Promise((r) => setTimeout(r, 300));
  await keeper.settled();
  assert.equal(keeper.get(deltaRecordId(y)), null);
  assert.ok((await store.get(deltaRecordId(y)))?.equals(record), 'written after the push');
});
