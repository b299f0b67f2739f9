// carryon-test: sqlite-only (parked copies live on the laptop; the broker sees a plain check-out, which runs on PostgreSQL in lifecycle.test.ts, and the agent's wipe and revoke in agent.test.ts)
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { appendFileSync, closeSync, existsSync, openSync, readdirSync, readFileSync, readSync, rmSync, writeFileSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { z } from 'zod';
import { runAgent } from '../../src/client/agent.js';
import { loadDevice } from '../../src/client/vault/home.js';
import { checkout, discardLocal, enroll, exportDisk, release, upload, type ClientEnv } from '../../src/client/ops.js';
import { chainOf, createMissingLayers } from '../../src/live/disks/disks.js';
import { topExtents } from '../../src/disk/chain.js';
import { eraseParked, listParked, readParked } from '../../src/client/vault/parked.js';
import { Vault } from '../../src/client/vault/vault.js';
import { fetchUnlockShare } from '../../src/client/vault/online-unlock.js';
import { onlineSession } from '../../src/client/session/session.js';
import { recordTrace, takeTrace } from '../../src/files/trace.js';
import { serveDesktop } from '../../src/client/ops/serve.js';
import { CarryonError } from '../../src/core/errors.js';
import type { RunningBroker } from '../../src/broker/start.js';
import { readDesktop, rewriteDataCluster, runCarryon, writeDesktop } from '../support/laptop.js';
import { brokerWithAlice, makeImage, type Api, serverDisk as sharedServerDisk } from '../broker/harness.js';

process.env.CARRYON_SCRYPT_N = '1024';
let broker: RunningBroker & { dir: string };
let http: Api;
let admin: string;
const CHUNK = 256 * 1024;
const logs: string[] = [];

function env(home: string): ClientEnv {
  return { home, user: 'alice', password: async () => 'alice-password', log: (l) => logs.push(l), pollMs: 20 };
}

let stop: () => Promise<void>;
before(async () => {
  ({ broker, http, admin, close: stop } = await brokerWithAlice());
});
after(() => stop());

/** A desktop of `mib` MiB (every other chunk random, makeImage) entitled to alice. */
async function desktop(name: string, mib = 16): Promise<void> {
  const image = makeImage(broker.dir, mib, `${name}.raw`);
  const r = await http.call('POST', '/v1/admin/desktops', { name, image, config: { vcpus: 1, ramMiB: 512, minRamMiB: 256 } }, admin);
  assert.equal(r.status, 201, JSON.stringify(r.body));
  await http.call('POST', '/v1/admin/entitlements', { principalType: 'user', principal: 'alice', targetType: 'desktop', target: name }, admin);
}

async function laptop(name: string): Promise<string> {
  const home = join(broker.dir, name);
  await enroll(env(home), broker.url, { fingerprint: broker.fingerprint, name });
  return home;
}

const serverDisk = (desktop: string) => sharedServerDisk(broker, desktop);

/** Chunks and bytes the transfer server sent while `fn` ran. */
async function onTheWire<T>(fn: () => Promise<T>): Promise<{ result: T; bytes: number }> {
  const before = broker.transfer!.stats.bytesOut;
  const result = await fn();
  return { result, bytes: broker.transfer!.stats.bytesOut - before };
}

const parkedFiles = (home: string) => (existsSync(join(home, 'parked')) ? readdirSync(join(home, 'parked')).filter((n) => !n.startsWith('.')) : []);

test('check-in parks the desktop; the next check-out on this device moves only the chunks changed on the server since, byte-identical', async () => {
  await desktop('office');
  const a = await laptop('laptop-a');
  const b = await laptop('laptop-b');
  const first = await onTheWire(() => checkout(env(a), 'office'));
  assert.equal(first.result.chunksMoved, 32, 'a 16 MiB desktop, every other chunk random: 32 chunks');
  await writeDesktop(env(a), 'office', [{ offset: 5 * CHUNK + 100, data: randomBytes(5000) }, { offset: 40 * CHUNK, data: randomBytes(CHUNK) }]);
  await upload(env(a), 'office', 'checkin');
  const parked = await listParked(a);
  assert.deepEqual(parked.map((p) => p.name), ['office']);
  assert.ok(parked[0]!.bytes > 0, 'the parked copy is counted');
  assert.equal(readdirSync(join(a, 'desktops')).length, 0, 'no checked-out desktop left');
  // Not runnable: serve, export and run refuse it, saying what it is and what to do.
  const isParked = (e: unknown) => e instanceof CarryonError && e.code === 'parked' && /only a parked copy is here.*carryon checkout office/.test(e.message);
  await assert.rejects(serveDesktop(env(a), 'office'), isParked);
  await assert.rejects(exportDisk(env(a), 'office', join(broker.dir, 'nope.raw'), 'raw'), isParked);
  const run = await runCarryon(a, ['run', 'office', '--dry-run']);
  assert.ok(run.code !== 0 && /only a parked copy is here/.test(run.out), run.out);
  const st = await runCarryon(a, ['status']);
  assert.match(st.out, /office: parked copy, [\d.]+ [KMG]i?B on this laptop/, st.out);

  // Another device changes three chunks on the server (one whole, two in part).
  await checkout(env(b), 'office');
  // ...and one random chunk becomes zeros (a hole on the server): the parked copy's data there must not show.
  await writeDesktop(env(b), 'office', [{ offset: 2 * CHUNK, data: randomBytes(CHUNK) }, { offset: 9 * CHUNK + 4096, data: randomBytes(4096) }, { offset: 60 * CHUNK + 8192, data: randomBytes(100) }, { offset: 4 * CHUNK, data: Buffer.alloc(CHUNK) }]);
  // Chunks that move to other indexes (6 and 8 swapped, 12 copied into the hole at 11): the parked copy holds them elsewhere.
  const had = await readDesktop(env(b), 'office');
  const chunkOf = (i: number) => had.subarray(i * CHUNK, (i + 1) * CHUNK);
  await writeDesktop(env(b), 'office', [{ offset: 6 * CHUNK, data: chunkOf(8) }, { offset: 8 * CHUNK, data: chunkOf(6) }, { offset: 11 * CHUNK, data: chunkOf(12) }]);
  await upload(env(b), 'office', 'checkin');

  logs.length = 0;
  const second = await onTheWire(() => checkout(env(a), 'office'));
  assert.equal(second.result.chunksMoved, 3, `only the 3 chunks changed since the parked check-in travel, not the 3 that moved\n${logs.join('\n')}`);
  assert.equal(second.result.copiedChunks, 3, 'the moved ones are copied from their old indexes');
  // Chunk 2 was rewritten whole and travels whole; 9 was a hole (a few KiB of a mostly-zero chunk); 60 changed in one
  // page of a random chunk the parked copy holds: its delta record (that page) travels, not the chunk (decision 66).
  assert.ok(second.bytes < CHUNK + 4 * 4096 && second.bytes >= CHUNK, `${second.bytes} bytes on the wire for 3 chunks, one as a page`);
  assert.ok(logs.some((l) => /2 kept to receive only their changed pages/.test(l)), logs.join('\n'));
  assert.equal(parkedFiles(a).length, 0, 'the parked copy became the check-out');
  assert.ok((await readDesktop(env(a), 'office')).equals(await serverDisk('office')), 'byte-identical to the server');
  await release(env(a), 'office', 'rollback');
});

test('pages over parked chunks: a check-out killed mid-fill resumes with only pages; `serve` taking one over reads the server\'s bytes, never a kept stale chunk', async () => {
  await desktop('pages');
  const a = await laptop('laptop-p');
  const b = await laptop('laptop-q');
  await checkout(env(a), 'pages');
  await release(env(a), 'pages', 'rollback');
  // Someone else writes one page into each of 10 random chunks (even indexes hold random data) and checks in.
  const changePages = async () => {
    await checkout(env(b), 'pages');
    await writeDesktop(env(b), 'pages', Array.from({ length: 10 }, (_, k) => ({ offset: 2 * k * CHUNK + 8192, data: randomBytes(4096) })));
    await upload(env(b), 'pages', 'checkin');
  };
  await changePages();
  const wire = broker.transfer!.stats.bytesOut;
  await killedWith('checkout-child.js', a, 'pages', { CARRYON_TEST_SIGKILL_AFTER_CHUNKS: '4' });
  logs.length = 0;
  const rest = await checkout(env(a), 'pages');
  const moved = broker.transfer!.stats.bytesOut - wire;
  // Pages the killed run wrote but had not recorded durable are written again over what they left (a mix of old and new chunk: equal outside the pages).
  assert.ok(rest.chunksMoved > 0 && rest.chunksMoved <= 10, `the rerun fetched what was not durable (${rest.chunksMoved})`);
  assert.ok(moved < 20 * (4096 + 512), `only pages travelled, before and after the kill: ${moved} bytes for 10 changed pages`);
  assert.ok((await readDesktop(env(a), 'pages')).equals(await serverDisk('pages')), 'byte-identical after the kill');
  await release(env(a), 'pages', 'rollback');

  // Killed with stale chunks still mapped for pages: `serve` (the guest's path) must not read them.
  await changePages();
  await killedWith('checkout-child.js', a, 'pages', { CARRYON_TEST_SIGKILL_AFTER_CHUNKS: '3' });
  assert.ok((await readDesktop(env(a), 'pages')).equals(await serverDisk('pages')), 'byte-identical through serve');
  await checkout(env(a), 'pages');
  assert.ok((await readDesktop(env(a), 'pages')).equals(await serverDisk('pages')), 'byte-identical once complete');
  await release(env(a), 'pages', 'rollback');
});

test('a login naming a check-out brings its unlock share, under the unlock route\'s rules: not to another device\'s session (audited)', async () => {
  await desktop('lobby');
  const a = await laptop('laptop-u');
  const b = await laptop('laptop-w');
  await checkout(env(a), 'lobby');
  const found = await (await Vault.open(a)).find('lobby');
  const { broker } = await onlineSession(env(a), undefined, found.checkoutId);
  try {
    const brought = broker.takeUnlockShare(found.checkoutId);
    const asked = await broker.call('POST', `/v1/checkouts/${found.checkoutId}/unlock`, {}, z.object({ share: z.string() }));
    assert.ok(brought && brought === asked.share, 'the same share as the unlock route gives');
    assert.equal(broker.takeUnlockShare(found.checkoutId), null, 'taken once');
  } finally {
    await broker.close();
  }
  // The same user on another device: no share, and the refusal is in the audit.
  const { broker: other } = await onlineSession(env(b), undefined, found.checkoutId);
  await other.close();
  assert.equal(other.takeUnlockShare(found.checkoutId), null);
  const events = (await http.call('GET', '/v1/admin/events?limit=10000', undefined, admin)).body.events as { action: string; outcome: string; detail?: string }[];
  assert.ok(events.some((e) => e.action === 'online-unlock' && e.outcome === 'denied' && /device/.test(e.detail ?? '')), JSON.stringify(events.filter((e) => e.action === "online-unlock")));
  // A check-in then opens the vault with the share its login brought: no separate round trip.
  recordTrace(true);
  try {
    await upload(env(a), 'lobby', 'checkin');
  } finally {
    recordTrace(false);
  }
  const spans = takeTrace().map((x) => x.name);
  assert.ok(spans.includes('vault-keys(online)') && !spans.includes('unlock-share'), spans.join(' '));
});

test('after a rollback the next check-out moves nothing; discard, a remote wipe and revoking the device erase parked copies; keepLocalCopy off keeps none', async () => {
  await desktop('lab');
  const a = await laptop('laptop-c');
  await checkout(env(a), 'lab');
  await writeDesktop(env(a), 'lab', [{ offset: 3 * CHUNK, data: randomBytes(CHUNK) }]);
  recordTrace(true);
  takeTrace();
  const rb = await release(env(a), 'lab', 'rollback').finally(() => recordTrace(false));
  assert.equal(rb.parked, true);
  // Parked without a KDF: the vault opened with the broker's unlock share (asked before the rollback ended the check-out), the park wrap made at check-out.
  const spans = takeTrace().map((t) => t.name);
  assert.ok(spans.includes('vault-keys(online)') && !spans.some((n) => n.includes('kdf')), `rolled back and parked with no KDF: ${spans.join(' ')}`);
  assert.ok((await readParked(a, (await listParked(a))[0]!.desktopId))?.online, 'the parked copy has an online wrap (the rollback\'s share)');
  recordTrace(true);
  takeTrace();
  const again = await onTheWire(() => checkout(env(a), 'lab')).finally(() => recordTrace(false));
  // The parked copy opened with the share the answer brought, the new vault's password wrap derived beside the rest: no KDF on the way.
  const taken = takeTrace().map((t) => t.name);
  assert.ok(taken.includes('open-parked(online)') && taken.includes('wrap-keys(beside)') && !taken.some((n) => n.includes('kdf') || n === 'wrap-keys'), `a second check-out without a KDF before the transfer: ${taken.join(' ')}`);
  assert.ok((await Vault.open(a).then((v) => v.find('lab'))).keys.wrapped, 'the password wrap is kept: it opens offline');
  assert.equal(again.result.chunksMoved, 0, 'the checkpoint is all here');
  assert.equal(again.bytes, 0, 'nothing on the wire');
  assert.ok((await readDesktop(env(a), 'lab')).equals(await serverDisk('lab')), 'the rolled-back copy is the server\'s');

  // A parked copy changed outside Carryon is erased, not used: its base's structure, then its record.
  const labDir = async () => join(a, 'parked', (await listParked(a))[0]!.desktopId);
  const tampers: [string, (dir: string) => void | Promise<void>][] = [
    ['base structure', (dir) => appendFileSync(join(dir, 'disks', 'disk0', 'base.qcow2'), Buffer.alloc(512))],
    // A data cluster rewritten, the structure left as it was (XTS cannot tell; the file's stamp can).
    ['base data', (dir) => rewriteDataCluster(join(dir, 'disks', 'disk0', 'base.qcow2'))],
    ['record', (dir) => {
      const f = JSON.parse(readFileSync(join(dir, 'parked.json'), 'utf8')) as { body: string };
      writeFileSync(join(dir, 'parked.json'), JSON.stringify({ ...f, body: f.body.replace('"how":"rollback"', '"how":"checkin"') }));
    }],
  ];
  for (const [what, tamper] of tampers) {
    await release(env(a), 'lab', 'rollback');
    await tamper(await labDir());
    logs.length = 0;
    const fresh = await checkout(env(a), 'lab');
    assert.equal(fresh.chunksMoved, 32, `${what} changed: everything fetched again`);
    assert.ok(logs.some((l) => /parked copy of lab cannot be used/.test(l)), logs.join('\n'));
    assert.deepEqual(parkedFiles(a), [], `${what} changed: the parked copy is erased`);
    assert.ok((await readDesktop(env(a), 'lab')).equals(await serverDisk('lab')), `${what} changed: byte-identical`);
  }

  // discard: the files are gone.
  await release(env(a), 'lab', 'rollback');
  assert.deepEqual(parkedFiles(a), [(await listParked(a))[0]!.desktopId]);
  await discardLocal(env(a), 'lab');
  assert.deepEqual(parkedFiles(a), [], 'discard erased it');

  // A remote wipe of the desktop reaches its parked copy.
  await checkout(env(a), 'lab');
  await release(env(a), 'lab', 'rollback');
  const device = (await loadDevice(a)).info.deviceId!;
  const labId = (await listParked(a))[0]!.desktopId;
  const q = await http.call('POST', `/v1/admin/devices/${device}/commands`, { type: 'wipe', desktopId: labId }, admin);
  assert.equal(q.status, 201, JSON.stringify(q.body));
  await runAgent(env(a), { once: true });
  assert.deepEqual(parkedFiles(a), [], 'the wipe erased it');
  const wipe = ((await http.call('GET', '/v1/admin/commands', undefined, admin)).body.commands as { type: string; state: string; result: string }[]).find((c) => c.type === 'wipe')!;
  assert.equal(wipe.state, 'done');

  // Policy keepLocalCopy off: released as before, nothing kept; the next check-out moves everything.
  await http.call('PUT', '/v1/admin/policies/desktop/lab', { keepLocalCopy: false }, admin);
  await checkout(env(a), 'lab');
  await release(env(a), 'lab', 'rollback');
  assert.deepEqual(parkedFiles(a), [], 'keepLocalCopy: false keeps none');
  await http.call('PUT', '/v1/admin/policies/desktop/lab', { keepLocalCopy: true }, admin);
  const full = await checkout(env(a), 'lab');
  assert.equal(full.chunksMoved, 32);
  await release(env(a), 'lab', 'rollback');
  assert.equal(parkedFiles(a).length, 1);
  // A size bound below the copy's size: erased at the release instead of parked.
  await http.call('PUT', '/v1/admin/policies/desktop/lab', { keepLocalCopyMaxGiB: 0.001 }, admin);
  await checkout(env(a), 'lab');
  logs.length = 0;
  await release(env(a), 'lab', 'rollback');
  assert.deepEqual(parkedFiles(a), [], 'larger than keepLocalCopyMaxGiB: not parked');
  assert.ok(logs.some((l) => /larger than policy keepLocalCopyMaxGiB/.test(l)), logs.join('\n'));
  await http.call('PUT', '/v1/admin/policies/desktop/lab', {}, admin);
  await checkout(env(a), 'lab');
  await release(env(a), 'lab', 'rollback');
  assert.equal(parkedFiles(a).length, 1);

  // Revoking the device: its agent erases every parked copy at the next heartbeat.
  const rv = await http.call('POST', `/v1/admin/devices/${device}/revoke`, {}, admin);
  assert.equal(rv.status, 200, JSON.stringify(rv.body));
  await runAgent(env(a), { once: true });
  assert.deepEqual(parkedFiles(a), [], 'revocation erased it');
});

/** Runs a support child (checkout-child or upload-child) for `name` on `home` that kills itself at `point` (parked.ts's test hooks). */
function killedAt(childFile: string, home: string, name: string, point: string): Promise<void> {
  return killedWith(childFile, home, name, { CARRYON_TEST_SIGKILL_PARKED: point });
}

/** The same, killed where `vars` say (any of the test hooks' variables). */
function killedWith(childFile: string, home: string, name: string, vars: Record<string, string>): Promise<void> {
  const point = JSON.stringify(vars);
  const child = new URL(`../support/${childFile}`, import.meta.url).pathname;
  return new Promise((resolve, reject) => {
    const p = spawn(process.execPath, [child, home, 'alice', 'alice-password', name], { env: { ...process.env, ...vars }, stdio: ['ignore', 'ignore', 'pipe'] });
    let stderr = '';
    p.stderr.setEncoding('utf8').on('data', (d: string) => (stderr += d));
    p.once('error', reject);
    p.once('close', (code, signal) => (signal === 'SIGKILL' ? resolve() : reject(new Error(`${childFile} at ${point} ended with ${code ?? signal}, not SIGKILL\n${stderr}`))));
  });
}

test('kill -9 while parking (then a check-out, or the check-in again, finishes it) and at each step of the take-over: the rerun finishes, only the changed chunks travel, byte-identical', async () => {
  await desktop('field');
  const a = await laptop('laptop-d');
  const b = await laptop('laptop-e');
  await checkout(env(a), 'field');
  await writeDesktop(env(a), 'field', [{ offset: 7 * CHUNK + 512, data: randomBytes(3000) }]);
  const written = await readDesktop(env(a), 'field');
  // Killed once the top is merged into the base, before the state says so: the top was left as it
  // was (it goes with the vault; not emptying it saves the merge's wall time), so the rerun merges the same bytes again.
  await killedAt('upload-child.js', a, 'field', 'merged');
  assert.equal(parkedFiles(a).length, 0, 'nothing parked yet');
  const vault = await Vault.open(a);
  const opened = await vault.openKeys(await loadDevice(a), 'alice-password', await vault.find('field'));
  assert.ok(opened.state.parking && opened.state.disks[0]!.mergingTo, 'the state still says merging');
  assert.ok((await topExtents(chainOf(vault, opened.state, opened.keys, 'disk0'))).length > 0, 'the top still holds the write');
  // The broker has the check-in: `status` says what is left to do here and the command that does it; `serve` refuses (a write now would be lost with the vault).
  const pending = await runCarryon(a, ['status']);
  assert.match(pending.out, /field: checked in \(snapshot [\w-]+\); putting its local copy away was cut off: run `carryon checkin field` to finish it/, pending.out);
  assert.match(pending.out, /field +checked_in .*NOT yet safe to go offline/, pending.out);
  const refusal = await serveDesktop(env(a), 'field').then(async (s) => s.close().then(() => 'served'), (e: unknown) => e);
  assert.ok(refusal instanceof CarryonError && refusal.code === 'wrong-state' && /carryon checkin field/.test(refusal.message), String(refusal));
  // The user checks it out again straight away: the park is finished (the check-in rerun's own steps), and the check-out starts from the parked copy.
  logs.length = 0;
  const again = await onTheWire(() => checkout(env(a), 'field'));
  assert.ok(logs.some((l) => /checked in field \(the check-in had been committed before it was cut off\)/.test(l)), logs.join('\n'));
  assert.equal(again.result.chunksMoved, 0, `nothing changed on the server since: nothing travels\n${logs.join('\n')}`);
  assert.equal(again.bytes, 0, 'nothing on the wire');
  assert.equal(parkedFiles(a).length, 0, 'the parked copy became the check-out');
  assert.ok((await readDesktop(env(a), 'field')).equals(written), 'the check-out holds what was checked in');
  assert.ok((await serverDisk('field')).equals(written), 'the check-in was committed once, as written');

  await writeDesktop(env(a), 'field', [{ offset: 9 * CHUNK, data: randomBytes(2000) }]);
  const written2 = await readDesktop(env(a), 'field');
  // A check-in cut off before this laptop knew of its commit (state checking_in, no `parking`): a check-out discards nothing and names the command.
  const v2 = await Vault.open(a);
  const o2 = await v2.openKeys(await loadDevice(a), 'alice-password', await v2.find('field'));
  await v2.save({ ...o2.state, state: 'checking_in' }, o2.keys);
  await assert.rejects(checkout(env(a), 'field'), (e: unknown) => e instanceof CarryonError && e.code === 'wrong-state' && /run `carryon checkin field`/.test(e.message));
  assert.match((await runCarryon(a, ['status'])).out, /field: a check-in was cut off before its commit was confirmed here: run `carryon checkin field` to finish it/);
  assert.ok((await readDesktop(env(a), 'field')).equals(written2), 'nothing was discarded');
  // Killed once the parked copy is published, before the vault is erased: the rerun only erases the vault.
  await killedAt('upload-child.js', a, 'field', 'publish');
  assert.equal(readdirSync(join(a, 'desktops')).length, 1, 'the vault is still there');
  assert.equal(parkedFiles(a).length, 1, 'and so is the parked copy');
  await upload(env(a), 'field', 'checkin');
  assert.equal(readdirSync(join(a, 'desktops')).length, 0);
  assert.ok((await serverDisk('field')).equals(written2), 'the check-in was committed once, as written');

  await checkout(env(b), 'field');
  await writeDesktop(env(b), 'field', [{ offset: 1 * CHUNK, data: randomBytes(CHUNK) }, { offset: 11 * CHUNK + 4096, data: randomBytes(4096) }, { offset: 30 * CHUNK, data: randomBytes(CHUNK) }]);
  await upload(env(b), 'field', 'checkin');

  // Before the parked base moves (re-keyed already), then before its matching chunks are recorded.
  const wire = broker.transfer!.stats.bytesOut;
  await killedAt('checkout-child.js', a, 'field', 'move');
  assert.equal(parkedFiles(a).length, 1, 'the parked copy is intact');
  await killedAt('checkout-child.js', a, 'field', 'filled');
  assert.equal(broker.transfer!.stats.bytesOut, wire, 'nothing was fetched yet');
  // `serve` takes the interrupted check-out over: it reads the server's bytes, never a parked chunk that differs.
  assert.ok((await readDesktop(env(a), 'field')).equals(await serverDisk('field')), 'byte-identical through serve');
  await checkout(env(a), 'field');
  const moved = broker.transfer!.stats.bytesOut - wire;
  // The 3 changed chunks, some twice (a chunk serve's guest read and its block-stream both fetched, or that the check-out then wrote again): never the desktop's 32.
  assert.ok(moved < 8 * CHUNK, `only the changed chunks travelled (${moved} bytes)`);
  assert.ok((await readDesktop(env(a), 'field')).equals(await serverDisk('field')), 'byte-identical after the kills');
  await release(env(a), 'field', 'rollback');
});

test('a cancelled check-out parks what arrived: the next check-out fetches only the rest', async () => {
  await desktop('partial');
  const a = await laptop('laptop-f');
  const abort = new AbortController();
  await assert.rejects(checkout({ ...env(a), signal: abort.signal, onProgress: (_l, p) => p.chunksDone >= 8 && abort.abort() }, 'partial'));
  const res = await release(env(a), 'partial', 'cancel');
  assert.equal(res.parked, true);
  const durable = (JSON.parse(readFileSync(join(a, 'parked', (await listParked(a))[0]!.desktopId, 'parked.json'), 'utf8')) as { body: string });
  const known = (JSON.parse(durable.body) as { disks: { known: number[] }[] }).disks[0]!.known.length;
  assert.ok(known > 0 && known < 32, `${known} chunks were durable`);
  const rest = await checkout(env(a), 'partial');
  assert.equal(rest.chunksMoved, 32 - known);
  assert.ok((await readDesktop(env(a), 'partial')).equals(await serverDisk('partial')), 'byte-identical');
  await release(env(a), 'partial', 'rollback');
});

test('a take-over cut off before the parked base moved, whose parked copy is then gone and a new base made: nothing is marked on the new base', async () => {
  await desktop('moved');
  const a = await laptop('laptop-g');
  await checkout(env(a), 'moved');
  await release(env(a), 'moved', 'rollback');
  const id = (await listParked(a))[0]!.desktopId;
  await killedAt('checkout-child.js', a, 'moved', 'move');
  // The parked copy goes (a wipe, say) and something makes a new, empty base while the take-over's record is still there.
  await eraseParked(a, id);
  const vault = await Vault.open(a);
  // Killed before its password wrap was kept (that KDF runs beside the transfer): only the check-out's online share opens it.
  const found = await vault.find('moved');
  assert.equal(found.keys.wrapped, undefined);
  await assert.rejects(vault.openKeys(await loadDevice(a), 'alice-password', found), (e: unknown) => e instanceof CarryonError && e.code === 'vault-incomplete' && /run `carryon checkout moved` again/.test(e.message));
  const { broker } = await onlineSession(env(a));
  const { state, keys } = await vault.openKeys(await loadDevice(a), 'alice-password', found, { unlockShare: await fetchUnlockShare(broker, found, () => undefined) }).finally(() => broker.close());
  await (await createMissingLayers(vault, state, keys)).tops;
  const done = await checkout(env(a), 'moved');
  assert.ok((await vault.find('moved')).keys.wrapped, 'the resumed check-out kept the password wrap');
  assert.equal(done.chunksMoved, 32, 'every chunk is fetched into the new base');
  assert.ok((await readDesktop(env(a), 'moved')).equals(await serverDisk('moved')), 'byte-identical');
  await release(env(a), 'moved', 'rollback');
});

test('a clone of a desktop this laptop holds (checked out or parked) moves nothing; a damaged local chunk is fetched; a locked sibling is not read', async () => {
  await desktop('gold');
  const h = await laptop('laptop-h');
  const clone = async (name: string) => {
    const r = await http.call('POST', '/v1/admin/desktops', { name, cloneOf: 'gold' }, admin);
    assert.equal(r.status, 201, JSON.stringify(r.body));
    await http.call('POST', '/v1/admin/entitlements', { principalType: 'user', principal: 'alice', targetType: 'desktop', target: name }, admin);
  };
  await checkout(env(h), 'gold');

  // A fresh clone of a checked-out desktop: every chunk is here already; nothing travels.
  await clone('gold-2');
  logs.length = 0;
  const fromHeld = await onTheWire(() => checkout(env(h), 'gold-2'));
  assert.equal(fromHeld.result.chunksMoved, 0, logs.join('\n'));
  assert.equal(fromHeld.bytes, 0, 'nothing on the wire');
  assert.equal(fromHeld.result.copiedChunks, 32);
  assert.ok(logs.some((l) => /copied 32 chunks from this laptop's copies of gold \(checked out\)/.test(l)), logs.join('\n'));
  assert.ok((await readDesktop(env(h), 'gold-2')).equals(await serverDisk('gold-2')), 'byte-identical to the server');

  // Both parked: a third clone is made from the parked copies, which stay as they are.
  await release(env(h), 'gold-2', 'rollback');
  await release(env(h), 'gold', 'rollback');
  await clone('gold-3');
  // Parked copies are read under the rules of the desktop's own: this check-out's policy says keep none, so none is read.
  await http.call('PUT', '/v1/admin/policies/desktop/gold-3', { keepLocalCopy: false }, admin);
  logs.length = 0;
  const refused = await checkout(env(h), 'gold-3');
  assert.equal(refused.chunksMoved, 32, logs.join('\n'));
  assert.ok(logs.some((l) => /the parked copy of gold is not read for this check-out \(policy keepLocalCopy is off\)/.test(l)), logs.join('\n'));
  await release(env(h), 'gold-3', 'rollback');
  await http.call('PUT', '/v1/admin/policies/desktop/gold-3', {}, admin);
  const fromParked = await onTheWire(() => checkout(env(h), 'gold-3'));
  assert.equal(fromParked.result.chunksMoved, 0);
  assert.equal(fromParked.bytes, 0);
  assert.ok((await readDesktop(env(h), 'gold-3')).equals(await serverDisk('gold-3')), 'byte-identical to the server');
  assert.equal(parkedFiles(h).length, 2, "the siblings' parked copies are kept");

  // A checked-out sibling whose base was changed on disk (one data cluster): that chunk is fetched, the rest copied.
  await release(env(h), 'gold-3', 'rollback');
  for (const n of ['gold-2', 'gold-3']) await discardLocal(env(h), n);
  await checkout(env(h), 'gold');
  const goldId = (await (await Vault.open(h)).find('gold')).desktopId;
  await rewriteDataCluster(join(h, 'desktops', goldId, 'disks', 'disk0', 'base.qcow2'));
  await clone('gold-4');
  logs.length = 0;
  const damaged = await onTheWire(() => checkout(env(h), 'gold-4'));
  assert.equal(damaged.result.chunksMoved, 1, `only the damaged chunk travels\n${logs.join('\n')}`);
  assert.equal(damaged.result.copiedChunks, 31);
  assert.equal(damaged.result.rejectedLocalChunks, 1);
  assert.ok(logs.some((l) => /gold \(checked out\), index \d+: its bytes do not match the chunk ID/.test(l)), logs.join('\n'));
  assert.ok((await readDesktop(env(h), 'gold-4')).equals(await serverDisk('gold-4')), 'byte-identical to the server');

  // A sibling that `run` would not open (locked: its unlock token gone) is not read: everything travels.
  await release(env(h), 'gold-4', 'rollback');
  await discardLocal(env(h), 'gold-4');
  rmSync(join(h, 'desktops', goldId, 'unlock.token'));
  await clone('gold-5');
  logs.length = 0;
  const locked = await onTheWire(() => checkout(env(h), 'gold-5'));
  assert.equal(locked.result.chunksMoved, 32, logs.join('\n'));
  assert.ok(logs.some((l) => /gold \(checked out\) is not read for this check-out \(gold is locked/.test(l)), logs.join('\n'));
  assert.ok((await readDesktop(env(h), 'gold-5')).equals(await serverDisk('gold-5')), 'byte-identical to the server');
});

/** Sets extended L2 (incompatible feature bit 4) in a qcow2 header, as session 13's bases had it. */
function markSubclusters(path: string): void {
  const fd = openSync(path, 'r+');
  try {
    const word = Buffer.alloc(8);
    readSync(fd, word, 0, 8, 72);
    word[7]! |= 0x10;
    writeSync(fd, word, 0, 8, 72);
  } finally {
    closeSync(fd);
  }
}

test('a base with subclusters (an earlier version made them; QEMU aborts copy-on-read over them) is not taken over from a parked copy, and `serve` does not start a desktop still arriving into one', async () => {
  await desktop('older');
  const a = await laptop('laptop-s');
  await checkout(env(a), 'older');
  await upload(env(a), 'older', 'checkin');
  assert.equal(parkedFiles(a).length, 1);
  markSubclusters(join(a, 'parked', parkedFiles(a)[0]!, 'disks', 'disk0', 'base.qcow2'));
  logs.length = 0;
  const again = await onTheWire(() => checkout(env(a), 'older'));
  assert.ok(logs.some((l) => /the parked copy of older cannot be used \(the base of disk disk0 has subclusters/.test(l)), logs.join('\n'));
  assert.equal(again.result.chunksMoved, 32, 'everything fetched again');
  assert.ok((await readDesktop(env(a), 'older')).equals(await serverDisk('older')), 'byte-identical to the server');

  // A check-out cut off while arriving into such a base (one session 13 began): serve says what to do instead.
  await desktop('older-2');
  await killedWith('checkout-child.js', a, 'older-2', { CARRYON_TEST_SIGKILL_AFTER_CHUNKS: '4' });
  const vault = await Vault.open(a);
  markSubclusters(join(vault.desktopDir((await vault.find('older-2')).desktopId), 'disks', 'disk0', 'base.qcow2'));
  const refusal = await serveDesktop(env(a), 'older-2').then(async (served) => served.close().then(() => 'served'), (e: unknown) => e);
  assert.ok(refusal instanceof CarryonError && refusal.code === 'wrong-state' && /still arriving into a base made by an earlier version .*run `carryon checkout older-2` to finish the download first/.test(refusal.message), String(refusal));
});
