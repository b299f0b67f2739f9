// carryon-test: sqlite-only (the laptop's home is the subject: what an owner edits there; the broker barely speaks)
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { randomBytes, type KeyObject } from 'node:crypto';
import { existsSync, readFileSync, renameSync, rmSync, statSync, truncateSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { loadDevice } from '../../src/client/vault/home.js';
import { checkout, enroll, status, upload, type ClientEnv } from '../../src/client/ops.js';
import { serveDesktop } from '../../src/client/ops/serve.js';
import { chainOf } from '../../src/live/disks/disks.js';
import { verifyBases } from '../../src/live/disks/layer-guard.js';
import { fileStamp } from '../../src/files/stamped.js';
import { exportDisk } from '../../src/client/ops/export-disk.js';
import { mapChain, mergeTop } from '../../src/disk/chain.js';
import { computeChunkId } from '../../src/core/chunk-id.js';
import { Vault, vaultScryptN } from '../../src/client/vault/vault.js';
import { unlock } from '../../src/client/vault/key-release.js';
import { createManifest, decodeManifest, encodeManifest, manifestDigest } from '../../src/core/chunks/manifest.js';
import { signLease } from '../../src/core/tokens/lease.js';
import { generateSigningKey, publicKeyToBase64, signBytes } from '../../src/core/signing.js';
import { writeLockRecord } from '../../src/client/vault/guards.js';
import { resetAgentClock } from '../../src/client/vault/agent-clock.js';
import type { RunningBroker } from '../../src/broker/start.js';
import { ADMIN, api, cleanup, makeImage, testBroker, type Api } from '../broker/harness.js';
import { moveTrustedClock, readDesktop, runCarryon, writeDesktop } from '../support/laptop.js';
import { exportCurrentSnapshot } from '../../src/broker/desktops/snapshot-image.js';
import { startTpm, stopTpms, swtpmSkip } from '../support/swtpm.js';

// The probes of issue 12: each edit, deletion or forgery of a file in the Carryon home ends in a
// refusal with a clear message, and the keys (so the LUKS secrets) are never handed out.
process.env.CARRYON_SCRYPT_N = '1024';
let broker: RunningBroker & { dir: string };
let http: Api;
let env: ClientEnv;
let vault: Vault;
let dir: string;
let admin: string;

before(async () => {
  broker = await testBroker();
  http = api(broker.url, broker.fingerprint);
  admin = await http.login(ADMIN.name, ADMIN.password);
  await http.call('POST', '/v1/admin/users', { name: 'alice', password: 'alice-password' }, admin);
  await http.call('POST', '/v1/admin/desktops', { name: 'win11', image: makeImage(broker.dir, 4), config: { vcpus: 1, ramMiB: 512, minRamMiB: 256 } }, admin);
  await http.call('POST', '/v1/admin/entitlements', { principalType: 'user', principal: 'alice', targetType: 'desktop', target: 'win11' }, admin);
  await http.call('POST', '/v1/admin/desktops', { name: 'tpmdesk', cloneOf: 'win11' }, admin);
  await http.call('POST', '/v1/admin/entitlements', { principalType: 'user', principal: 'alice', targetType: 'desktop', target: 'tpmdesk' }, admin);
  env = { home: join(broker.dir, 'laptop'), user: 'alice', password: async () => 'alice-password', log: () => undefined, pollMs: 20 };
  await enroll(env, broker.url, { fingerprint: broker.fingerprint, name: 'laptop' });
  await checkout(env, 'win11');
  vault = await Vault.open(env.home);
  dir = vault.desktopDir((await vault.find('win11')).desktopId);
});
after(async () => {
  stopTpms();
  await http.close();
  await broker.close();
  cleanup(broker.dir);
});

/** Opens the desktop offline as `run`/`serve` would; resolves only if the keys were released. */
const open = async (home = env.home) => {
  const v = await Vault.open(home);
  return unlock(v, await loadDevice(home), 'alice-password', await v.find('win11'));
};

/** Runs `fn` against a file changed by `edit`, then puts the original back. */
async function probe(file: string, edit: (path: string) => void, fn: () => Promise<void>): Promise<void> {
  const path = join(dir, file);
  const saved = readFileSync(path);
  try {
    edit(path);
    await fn();
  } finally {
    writeFileSync(path, saved);
  }
  await open(); // and the untouched home still opens
}

test('baseline: the untouched home opens', async () => {
  const { keys } = await open();
  assert.equal(keys.dataKey.length, 32);
});

test('state.json edited (policy, disk layout) or deleted: refused', async () => {
  const edit = (change: (body: Record<string, unknown>) => void) => (path: string) => {
    const file = JSON.parse(readFileSync(path, 'utf8')) as { body: string };
    const body = JSON.parse(file.body) as Record<string, unknown>;
    change(body);
    writeFileSync(path, JSON.stringify({ ...file, body: JSON.stringify(body) }));
  };
  await probe('state.json', edit((b) => { (b.config as Record<string, unknown>).usb = true; }), () => assert.rejects(open(), { code: 'state-tampered', message: /altered outside Carryon/ }));
  await probe('state.json', edit((b) => { b.lockDigest = 'a'.repeat(64); }), () => assert.rejects(open(), { code: 'state-tampered' }));
  await probe('state.json', (p) => rmSync(p), () => assert.rejects(open(), { code: 'not-held' }));
});

test('a manifest with two chunks swapped and its checksums fixed: refused (the MACed state pins its digest)', async () => {
  const s = await vault.find('win11');
  const digest = s.disks[0]!.baseDigest;
  const m = await vault.manifest(s.desktopId, digest);
  const a = m.chunks.findIndex((c) => c !== null);
  const b = m.chunks.findIndex((c) => c !== null && c !== m.chunks[a]);
  assert.ok(a >= 0 && b >= 0, 'two different chunks to swap');
  [m.chunks[a], m.chunks[b]] = [m.chunks[b]!, m.chunks[a]!];
  const forged = manifestDigest(m);
  writeFileSync(join(dir, 'manifests', forged), encodeManifest(m));
  assert.deepEqual(decodeManifest(readFileSync(join(dir, 'manifests', forged))).chunks[a], m.chunks[a]);
  await probe('state.json', (p) => writeFileSync(p, readFileSync(p, 'utf8').replace(digest, forged)), () => assert.rejects(open(), { code: 'state-tampered' }));
  // The same digest name with other bytes is refused by the digest check.
  await probe(join('manifests', digest), (p) => writeFileSync(p, encodeManifest(m)), () => assert.rejects(vault.manifest(s.desktopId, digest), /damaged/));
});

test('clock.json deleted, altered, or an older copy put back with the clock moved: refused', async () => {
  await probe('clock.json', (p) => rmSync(p), () => assert.rejects(open(), { code: 'clock-untrusted', message: /missing: connect to the broker and run `carryon login`/ }));
  await probe('clock.json', (p) => writeFileSync(p, readFileSync(p, 'utf8').replace(/"mac":"[0-9a-f]/, '"mac":"x')), () => assert.rejects(open(), { code: 'clock-untrusted', message: /altered|damaged/ }));
  const older = readFileSync(join(dir, 'clock.json'));
  await moveTrustedClock(env.home, 'win11', 400 * 24 * 3600_000);
  await assert.rejects(open(), { code: 'lease-expired' }, 'time moved past the lease');
  const [st] = await status(env, 'win11');
  assert.match(st!.problem ?? '', /offline lease expired/, 'status still answers');
  writeFileSync(join(dir, 'clock.json'), older); // without a TPM an older genuine copy is a backup restore (docs/security.md)
});

test('agent-clock.json (the device clock record) deleted, its time edited, or signed by another key: refused; an older genuine copy gains nothing', async () => {
  const file = join('..', '..', 'agent-clock.json'); // the home's, beside device.json
  const resign = (key: KeyObject | null, hoursBack: number) => (p: string) => {
    const signed = JSON.parse(readFileSync(p, 'utf8')) as { payload: string; signature: string };
    const body = JSON.parse(Buffer.from(signed.payload, 'base64').toString('utf8')) as { time: string };
    const bytes = Buffer.from(JSON.stringify({ ...body, time: new Date(Date.parse(body.time) - hoursBack * 3600_000).toISOString() }));
    writeFileSync(p, JSON.stringify({ payload: bytes.toString('base64'), signature: key ? signBytes(key, bytes) : signed.signature }));
  };
  await probe(file, (p) => rmSync(p), () => assert.rejects(open(), { code: 'clock-untrusted', message: /agent-clock\.json.* is missing.*carryon login/ }));
  await probe(file, resign(null, 1), () => assert.rejects(open(), { code: 'clock-untrusted', message: /not signed by this device's key/ }));
  await probe(file, resign(generateSigningKey().privateKey, 1), () => assert.rejects(open(), { code: 'clock-untrusted', message: /not signed by this device's key/ }));
  await probe(file, (p) => writeFileSync(p, '{"payload":'), () => assert.rejects(open(), { code: 'clock-untrusted', message: /is damaged/ }));
  // An older genuine copy verifies, but gains nothing once a vault open has taken the newer time
  // into the desktop's own record. (Both put back, as a restored backup of the whole home, do: no TPM.)
  const agentFile = join(env.home, 'agent-clock.json');
  const [older, savedClock] = [readFileSync(agentFile), readFileSync(join(dir, 'clock.json'))];
  const device = await loadDevice(env.home);
  await resetAgentClock(env.home, device.privateKey, device.info.deviceId!, new Date(Date.now() + 400 * 24 * 3600_000).toISOString());
  await assert.rejects(open(), { code: 'lease-expired' }, 'the device record, past the deadline, bounds time');
  writeFileSync(agentFile, older);
  await assert.rejects(open(), { code: 'lease-expired' }, 'the desktop\'s own record took the newer time');
  writeFileSync(join(dir, 'clock.json'), savedClock);
  await open();
});

test('the unlock token deleted, or a lock record forged: locked', async () => {
  await probe('unlock.token', (p) => rmSync(p), async () => {
    await assert.rejects(open(), { code: 'desktop-locked', message: /lock record is missing or was altered/ });
    assert.equal((await status(env, 'win11'))[0]!.state, 'locked');
    // An "administrator unlocked it" record signed by any key but this device's changes nothing.
    await writeLockRecord(dir, generateSigningKey().privateKey, { desktopId: (await vault.find('win11')).desktopId, reason: 'admin-unlocked', at: new Date().toISOString(), leaseIssuedAt: null });
    await assert.rejects(open(), { code: 'desktop-locked' });
    rmSync(join(dir, 'lock.json'));
  });
  await probe('unlock.token', (p) => writeFileSync(p, randomBytes(32).toString('hex')), () => assert.rejects(open(), { code: 'desktop-locked' }));
});

test('a lease forged with another key (and device.json pointed at that key): refused', async () => {
  const s = await vault.find('win11');
  const forger = generateSigningKey();
  const device = await loadDevice(env.home);
  const forged = signLease({ v: 1, user: 'alice', deviceId: device.info.deviceId!, desktops: [s.desktopId], deadline: new Date(Date.now() + 900 * 24 * 3600_000).toISOString(), issuedAt: new Date().toISOString(), policyHash: 'f'.repeat(64) }, forger.privateKey);
  writeFileSync(join(dir, 'lease.json'), JSON.stringify(forged));
  const devFile = join(env.home, 'device.json');
  const saved = readFileSync(devFile, 'utf8');
  writeFileSync(devFile, saved.replace(/"signingPublicKey": "[^"]+"/, `"signingPublicKey": "${publicKeyToBase64(forger.publicKey)}"`));
  try {
    await assert.rejects(open(), { code: 'lease-signature', message: /renewed lease .* pinned broker key/ });
    // `login --offline` says so and fails, as `serve` would (finding 5).
    const cli = await runCarryon(env.home, ['login', '--offline']);
    assert.equal(cli.code, 3, cli.out);
    assert.match(cli.out, /win11: refused \[lease-signature\]: .*renewed lease/);
  } finally {
    writeFileSync(devFile, saved);
    rmSync(join(dir, 'lease.json'));
  }
});

test('local-config.json changes presentation only: USB stays as the broker set it', async () => {
  writeFileSync(join(dir, 'local-config.json'), JSON.stringify({ usb: true, display: 'none', ramMiB: 65536 }));
  writeFileSync(join(dir, 'policy.json'), JSON.stringify({ usbAllowed: false }));
  const before = await vault.find('win11');
  const served = await serveDesktop(env, 'win11');
  try {
    assert.equal(served.config.usb, false);
    assert.equal(served.config.ramMiB, 512);
    assert.equal(served.config.display, 'none');
  } finally {
    await served.close();
    rmSync(join(dir, 'local-config.json'));
    rmSync(join(dir, 'policy.json'));
  }
  // The vault records the layers at close, never the view the desktop ran with (a later policy may grant again).
  const after = await vault.find('win11');
  assert.deepEqual([after.config, after.localConfig], [before.config, before.localConfig]);
});

test('the home copied to another machine (cp -a, another device secret): refused', async () => {
  const copy = join(broker.dir, 'other-laptop');
  execFileSync('cp', ['-a', env.home, copy]);
  writeFileSync(join(copy, 'device.secret'), randomBytes(32));
  await assert.rejects(open(copy), { code: 'vault-locked', message: /another device/ });
  await assert.rejects(status({ ...env, home: copy }, 'win11'), { code: 'vault-locked' });
  renameSync(copy, `${copy}-gone`);
});

test('a lowered KDF cost in production: refused for new wraps and for opening a cheap vault', async () => {
  const prod = { ...process.env, NODE_ENV: 'production', CARRYON_INSECURE_TEST_KDF: undefined, CARRYON_SCRYPT_N: '1024' };
  assert.throws(() => vaultScryptN(prod), { code: 'kdf-refused', message: /honoured only in tests/ });
  assert.equal(vaultScryptN({ NODE_ENV: 'production' }), 1 << 17, 'production default is 2^17');
  const saved = { NODE_ENV: process.env.NODE_ENV, K: process.env.CARRYON_INSECURE_TEST_KDF };
  process.env.NODE_ENV = 'production';
  delete process.env.CARRYON_INSECURE_TEST_KDF;
  try {
    await assert.rejects(open(), { code: 'kdf-refused', message: /N=1024, below the minimum/ });
    await assert.rejects(status(env, 'win11'), { code: 'kdf-refused' });
  } finally {
    process.env.NODE_ENV = saved.NODE_ENV;
    if (saved.K !== undefined) process.env.CARRYON_INSECURE_TEST_KDF = saved.K;
  }
});

test('with a TPM: the home copied to another machine (cp -a, another TPM) refuses; the clock record holds the TPM clock', { skip: swtpmSkip }, async () => {
  const saved = process.env.TPM2TOOLS_TCTI;
  process.env.TPM2TOOLS_TCTI = await startTpm();
  try {
    const home = join(broker.dir, 'tpm-laptop');
    const tenv = { ...env, home };
    await enroll(tenv, broker.url, { fingerprint: broker.fingerprint, name: 'tpm-laptop', secretStorage: 'tpm' });
    await checkout(tenv, 'tpmdesk');
    const v = await Vault.open(home);
    const s = await v.find('tpmdesk');
    const opened = await unlock(v, await loadDevice(home), 'alice-password', s);
    assert.equal(opened.lease.desktops.includes(s.desktopId), true);
    const clock = JSON.parse(JSON.parse(readFileSync(join(v.desktopDir(s.desktopId), 'clock.json'), 'utf8')).body) as { tpm: { clock: number } | null };
    assert.ok(clock.tpm && clock.tpm.clock > 0, 'the trusted clock is anchored to the TPM clock');
    // 400 days pass on the TPM's clock (which software can only advance) while the system clock
    // and the record say today: the lease has expired.
    const now = Number(/clock: (\d+)/.exec(execFileSync('tpm2_readclock', { encoding: 'utf8' }))![1]);
    execFileSync('tpm2_setclock', [String(now + 400 * 24 * 3600_000)]);
    // The device clock record (signed with the TPM-sealed device key) says today: it only adds a floor, never lowers the TPM's.
    assert.ok(existsSync(join(home, 'agent-clock.json')));
    await assert.rejects(unlock(v, await loadDevice(home), 'alice-password', s), { code: 'lease-expired' });
    const copy = join(broker.dir, 'tpm-laptop-copy');
    execFileSync('cp', ['-a', home, copy]);
    process.env.TPM2TOOLS_TCTI = await startTpm();
    await assert.rejects(loadDevice(copy), { code: 'tpm', message: /another machine/ });
  } finally {
    if (saved === undefined) delete process.env.TPM2TOOLS_TCTI;
    else process.env.TPM2TOOLS_TCTI = saved;
  }
});

test('lineage key rotation: blobs sealed after it use the new generation; the snapshot reads old and new blobs alike', async () => {
  const r = await http.call('POST', '/v1/admin/desktops/win11/rotate-key', {}, admin);
  assert.equal(r.status, 200, JSON.stringify(r.body));
  assert.equal((r.body as { generation: number }).generation, 1);
  // The laptop checked out before the rotation (generation 0 only); the transfer server holds both.
  await writeDesktop(env, 'win11', [{ offset: 4096, data: randomBytes(8192) }, { offset: 3 * 1024 * 1024, data: randomBytes(300 * 1024) }]);
  const laptop = await readDesktop(env, 'win11');
  await upload(env, 'win11', 'checkin');
  const out = join(broker.dir, 'after-rotation.raw');
  await exportCurrentSnapshot(broker.ctx, 'win11', out);
  assert.ok(readFileSync(out).equals(laptop), 'byte-identical across generations');
});

// Issue 22, finding 4: the layers themselves. XTS has no integrity, so each edit below once read
// back as other bytes with rc=0. Each now ends refused (the shape recorded at the last clean
// close, one LUKS secret per layer) or reported (the base's chunk IDs, the top's file stamp).
const nbdcopyOut = (socketPath: string) => {
  const out = join(broker.dir, `copy-${randomBytes(4).toString('hex')}.raw`);
  execFileSync('nbdcopy', [`nbd+unix:///disk0?socket=${socketPath}`, out]);
  return readFileSync(out);
};

/** `serve` opens the desktop and nbdcopy reads back exactly the reference bytes. */
async function servesReference(): Promise<void> {
  const served = await serveDesktop(env, 'win11');
  try {
    assert.ok(nbdcopyOut(served.socketPath).equals(reference));
  } finally {
    await served.close();
  }
}

const layer = (name: 'base' | 'top') => join(dir, 'disks', 'disk0', `${name}.qcow2`);

/** Host offset of the first data cluster of a qcow2 layer (read from its L1 and first L2 table). */
function firstDataCluster(path: string): { at: number; clusterSize: number } {
  const f = readFileSync(path);
  const clusterSize = 2 ** f.readUInt32BE(20);
  const l1 = Number(f.readBigUInt64BE(40));
  const mask = 0x00ff_ffff_ffff_fe00n;
  const l2 = Number(f.readBigUInt64BE(l1) & mask);
  const step = f.readUInt32BE(72 + 4) & 0x10 ? 16 : 8; // extended L2 (incompatible bit 4): 16-byte entries
  for (let i = 0; i < clusterSize; i += step) {
    const at = Number(f.readBigUInt64BE(l2 + i) & mask);
    if (at !== 0) return { at, clusterSize };
  }
  throw new Error(`${path} has no data cluster`);
}

/** Runs one tamper case on copies put back afterwards (the layers, the state and the failures). */
async function tamperCase(edit: () => void, fn: () => Promise<void>): Promise<void> {
  const files = [layer('base'), layer('top'), join(dir, 'state.json')];
  const saved = files.map((f) => readFileSync(f));
  try {
    edit();
    await fn();
  } finally {
    files.forEach((f, i) => writeFileSync(f, saved[i]!));
    rmSync(join(dir, 'failures.json'), { force: true });
  }
}

const serveRefused = (code: string, message: RegExp) => assert.rejects(serveDesktop(env, 'win11'), { code, message });

let reference: Buffer;
test('layers: the reference read of a desktop with writes in its top layer', async () => {
  // Checked out again (the rotation test checked it in): a vault made by this version.
  await checkout(env, 'win11');
  dir = vault.desktopDir((await vault.find('win11')).desktopId);
  assert.equal((await vault.find('win11')).layerSecrets, 'per-layer');
  await writeDesktop(env, 'win11', [{ offset: 64 * 1024, data: randomBytes(64 * 1024) }, { offset: 2 * 1024 * 1024 + 4096, data: randomBytes(8192) }]);
  const served = await serveDesktop(env, 'win11');
  try {
    reference = nbdcopyOut(served.socketPath);
  } finally {
    await served.close();
  }
  const [st] = await status(env, 'win11');
  assert.equal(st!.problem, null);
  // QEMU had the complete base read-only: it is still the file check-out verified, so check-in will not read it again.
  const d = (await vault.find('win11')).disks[0]!;
  assert.deepEqual(d.baseVerified, await fileStamp(layer('base')));
  assert.equal(d.shapes.base?.size, statSync(layer('base')).size);
});

test('layers: the base header\'s L1 offset changed, the base truncated to half, the top truncated inside a data cluster: refused (layer-tampered)', async () => {
  await tamperCase(() => {
    const f = readFileSync(layer('base'));
    f.writeBigUInt64BE(f.readBigUInt64BE(40) + 65536n, 40);
    writeFileSync(layer('base'), f);
  }, async () => {
    await serveRefused('layer-tampered', /base layer of disk disk0 .* structure .* changed.*nothing was deleted/);
    assert.match((await status(env, 'win11'))[0]!.problem ?? '', /base layer .* changed outside Carryon/);
    // Nor is a plaintext export made of it (where policy allows exports at all).
    const { keys, state } = await vault.openKeys(await loadDevice(env.home), 'alice-password', await vault.find('win11'));
    await vault.save({ ...state, config: { ...state.config, exportAllowed: true } }, keys);
    await assert.rejects(exportDisk(env, 'win11', join(broker.dir, 'tampered.raw'), 'raw'), { code: 'layer-tampered' });
  });
  await tamperCase(() => truncateSync(layer('base'), Math.floor(statSync(layer('base')).size / 2)), () => serveRefused('layer-tampered', /base layer .* size changed/));
  await tamperCase(() => {
    const { at } = firstDataCluster(layer('top'));
    truncateSync(layer('top'), at + 1000);
  }, () => serveRefused('layer-tampered', /top layer .* size changed/));
});

test('layers: base.qcow2 and top.qcow2 swapped: refused; and each layer has its own LUKS secret, so the swapped chain does not even open', async () => {
  await tamperCase(() => {
    renameSync(layer('base'), `${layer('base')}.x`);
    renameSync(layer('top'), layer('base'));
    renameSync(`${layer('base')}.x`, layer('top'));
  }, async () => {
    await serveRefused('layer-tampered', /base layer .* changed outside Carryon/);
    const { keys, state } = await vault.openKeys(await loadDevice(env.home), 'alice-password', await vault.find('win11'));
    const chain = chainOf(vault, state, keys, 'disk0');
    assert.notEqual(chain.baseSecret, undefined);
    assert.notEqual(chain.baseSecret, chain.secret);
    await assert.rejects(mapChain(chain, 'base'), { code: 'disk-key-refused' });
  });
});

test('layers: a byte flipped in a base data cluster (and one per 4 KiB page): reported, the desktop marked damaged, the export stopped; status shows it; the next open refuses', async () => {
  const flips: ((f: Buffer, at: number, size: number) => void)[] = [
    (f, at) => { f[at + 777] ^= 0x01; },
    (f, at, size) => { for (let p = 0; p < size; p += 4096) f[at + p + 5] ^= 0x80; },
  ];
  for (const flip of flips) {
    await tamperCase(() => {
      const { at, clusterSize } = firstDataCluster(layer('base'));
      const f = readFileSync(layer('base'));
      flip(f, at, clusterSize);
      writeFileSync(layer('base'), f);
    }, async () => {
      const served = await serveDesktop(env, 'win11');
      try {
        for (let i = 0; i < 200 && !(await vault.find('win11')).damaged; i++) await new Promise((r) => setTimeout(r, 50));
        assert.match((await vault.find('win11')).damaged?.message ?? '', /base layer of disk disk0 no longer matches its checkpoint: chunk \d+/);
        assert.throws(() => nbdcopyOut(served.socketPath), 'the export is stopped');
      } finally {
        await served.close();
      }
      const [st] = await status(env, 'win11');
      assert.match(st!.problem ?? '', /marked damaged/);
      assert.ok(st!.readFailures >= 1, 'filed for the agent\'s heartbeat');
      await serveRefused('base-damaged', /marked damaged .* cannot be checked in/);
      await assert.rejects(upload(env, 'win11', 'checkin'), { code: 'base-damaged' });
    });
  }
});

test('layers: a byte flipped in a top data cluster: reported at the next open and by status (XTS cannot tell other bytes from the guest\'s)', async () => {
  await writeDesktop(env, 'win11', []); // a clean close records the top as it is now
  await tamperCase(() => {
    const { at } = firstDataCluster(layer('top'));
    const f = readFileSync(layer('top'));
    f[at + 65536 + 100] ^= 0x01; // guest offset 64 KiB + 100: an allocated subcluster
    writeFileSync(layer('top'), f);
  }, async () => {
    assert.match((await status(env, 'win11'))[0]!.problem ?? '', /top layer of disk disk0 was written outside Carryon/);
    const served = await serveDesktop(env, 'win11');
    try {
      assert.ok(!nbdcopyOut(served.socketPath).equals(reference), 'the flipped cluster reads as other bytes');
    } finally {
      await served.close();
    }
    const [st] = await status(env, 'win11');
    assert.match(st!.lastReadFailure ?? '', /top layer of disk disk0 of win11 was written outside Carryon/);
  });
  await writeDesktop(env, 'win11', []);
  const served = await serveDesktop(env, 'win11');
  try {
    assert.ok(nbdcopyOut(served.socketPath).equals(reference), 'put back, the desktop reads as before');
  } finally {
    await served.close();
  }
});

test('layers: a base changed while the desktop was closed is checked before check-in: refused (base-damaged), nothing sent', async () => {
  await tamperCase(() => {
    const { at } = firstDataCluster(layer('base'));
    const f = readFileSync(layer('base'));
    f[at + 4096] ^= 0x04;
    writeFileSync(layer('base'), f);
  }, async () => {
    await assert.rejects(upload(env, 'win11', 'checkin'), { code: 'base-damaged', message: /chunk 0 .* does not match/ });
    assert.equal((await vault.find('win11')).state, 'checked_out', 'the check-in never began');
  });
});

test('layers: after a crash (state still open for writing) a changed top is checked by qemu-img and recorded again, not refused', async () => {
  const { keys, state } = await vault.openKeys(await loadDevice(env.home), 'alice-password', await vault.find('win11'));
  await vault.save({ ...state, layersOpen: true }, keys);
  const grown = statSync(layer('top')).size + 65536;
  truncateSync(layer('top'), grown); // what a killed QEMU may leave: clusters past the last record
  await servesReference();
  const after = await vault.find('win11');
  assert.equal(after.layersOpen, false);
  assert.equal(after.disks[0]!.shapes.top?.size, statSync(layer('top')).size);
  assert.equal((await status(env, 'win11'))[0]!.problem, null);
});

test('layers: a replica\'s merge killed after qemu-img commit (both layers changed, state still merging) is finished and recorded, not refused', async () => {
  const { keys, state } = await vault.openKeys(await loadDevice(env.home), 'alice-password', await vault.find('win11'));
  const m = await vault.manifest(state.desktopId, state.disks[0]!.baseDigest);
  // The restore point this laptop would have computed: the chunk IDs of what the desktop reads now.
  const ids = m.chunks.map((_, i) => {
    const chunk = reference.subarray(i * m.chunkSize, Math.min((i + 1) * m.chunkSize, m.diskSize));
    return chunk.every((b) => b === 0) ? null : computeChunkId(keys.idKey, chunk);
  });
  const digest = await vault.putManifest(state.desktopId, createManifest(m.chunkSize, m.diskSize, ids));
  await vault.save({ ...state, disks: state.disks.map((d) => ({ ...d, mergingTo: digest })) }, keys);
  await mergeTop(chainOf(vault, state, keys, 'disk0')); // the kill came after this, before the state moved on
  await servesReference();
  let after = await vault.find('win11');
  assert.equal(after.disks[0]!.baseDigest, digest);
  assert.deepEqual(after.disks[0]!.baseVerified, await fileStamp(layer('base')), 'recorded as verified by the merge');
  // And every chunk of the merged base matches the restore point's IDs (the whole check, unthrottled).
  await verifyBases(vault, keys, () => after, (s) => (after = s), { always: true });
  assert.equal(after.damaged, null);
  assert.equal((await status(env, 'win11'))[0]!.problem, null);
});
