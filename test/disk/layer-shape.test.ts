import assert from 'node:assert/strict';
import { createDecipheriv, hkdfSync, randomBytes } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, test } from 'node:test';
import { deriveDiskSecret } from '../../src/core/keys.js';
import { createLayerFromTemplate } from '../../src/disk/layer-template.js';
import { measureLayer } from '../../src/disk/layer-shape.js';
import { Qcow2Reader } from '../../src/disk/qcow2/qcow2-reader.js';
import { Qcow2BaseWriter } from '../../src/disk/qcow2/qcow2-base-writer.js';
import { XtsSectors } from '../../src/disk/qcow2/xts.js';

const dir = mkdtempSync(join(tmpdir(), 'carryon-shape-'));
after(() => rmSync(dir, { recursive: true, force: true }));
const templates = process.env.CARRYON_TEMPLATE_DIR ?? join(dir, 'templates');
const PASS = randomBytes(32).toString('base64');
const CHUNK = 256 * 1024;

test('one LUKS secret per layer; without a layer the secret of vaults made before (v2) is unchanged', () => {
  const keys = { dataKey: randomBytes(32), idKey: randomBytes(32), vaultKey: randomBytes(32) };
  const salt = randomBytes(16);
  const base = deriveDiskSecret(keys, 'd1', 'disk0', salt, 'base');
  const top = deriveDiskSecret(keys, 'd1', 'disk0', salt, 'top');
  const shared = deriveDiskSecret(keys, 'd1', 'disk0', salt);
  assert.equal(new Set([base, top, shared]).size, 3);
  const v2 = Buffer.from(hkdfSync('sha256', Buffer.concat([keys.vaultKey, keys.dataKey, keys.idKey]), salt, Buffer.from('carryon-disk-luks:v2:d1:disk0'), 32)).toString('base64');
  assert.equal(shared, v2, 'an older vault still opens');
});

test('XtsSectors.decryptView is OpenSSL aes-256-xts decryption (plain64 IVs)', () => {
  const key = randomBytes(64);
  const xts = new XtsSectors(key);
  const plain = randomBytes(16 * 1024);
  for (const first of [0, 77, 2 ** 33 + 5]) {
    const cipher = Buffer.from(xts.encryptView(plain, first));
    assert.ok(Buffer.from(xts.decryptView(cipher, first)).equals(plain));
    const iv = Buffer.alloc(16);
    iv.writeBigUInt64LE(BigInt(first + 3));
    const d = createDecipheriv('aes-256-xts', key, iv);
    assert.ok(Buffer.concat([d.update(cipher.subarray(3 * 512, 4 * 512)), d.final()]).equals(plain.subarray(3 * 512, 4 * 512)));
  }
});

test('the base reader reads what the base writer wrote (holes as zeros, unaligned ranges); the shape changes with the structure, not with reads', async () => {
  const path = join(dir, 'base.qcow2');
  const size = 20 * CHUNK + 4096;
  await createLayerFromTemplate(templates, { kind: 'base', clusterSize: CHUNK }, path, size, PASS);
  const empty = await measureLayer(path);
  const want = Buffer.alloc(size);
  const w = await Qcow2BaseWriter.open(path, PASS, CHUNK, { directIo: false });
  for (const i of [0, 7, 20]) {
    const plain = randomBytes(Math.min(CHUNK, size - i * CHUNK));
    plain.copy(want, i * CHUNK);
    await w.write(i, plain);
  }
  await w.persist();
  await w.close();
  const written = await measureLayer(path);
  assert.notEqual(written.sha256, empty.sha256, 'new L2 entries change the shape');
  const r = await Qcow2Reader.open(path, PASS);
  try {
    assert.ok((await r.read(0, size)).equals(want));
    assert.ok((await r.read(7 * CHUNK - 1000, 3000)).equals(want.subarray(7 * CHUNK - 1000, 7 * CHUNK + 2000)));
    assert.ok((await r.read(20 * CHUNK + 100, 200)).equals(want.subarray(20 * CHUNK + 100, 20 * CHUNK + 300)));
  } finally {
    await r.close();
  }
  assert.deepEqual(await measureLayer(path), written, 'reading changes nothing');
  await assert.rejects(Qcow2Reader.open(path, randomBytes(32).toString('base64')), /passphrase does not open/);
  // An L1 entry is structure.
  const f = readFileSync(path);
  const flipped = Buffer.from(f);
  flipped[f.readUInt32BE(36) > 0 ? Number(f.readBigUInt64BE(40)) + 1 : 0]! ^= 1;
  writeFileSync(path, flipped);
  assert.notEqual((await measureLayer(path)).sha256, written.sha256);
  writeFileSync(path, f);
  const garbage = join(dir, 'garbage.qcow2');
  writeFileSync(garbage, randomBytes(1000));
  assert.equal((await measureLayer(garbage)).size, 1000, 'never throws on a damaged image');
});
