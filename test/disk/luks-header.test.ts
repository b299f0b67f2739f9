// carryon-test: serial (LUKS creation benchmarks PBKDF on both cores; it flaked beside another heavy file)
import assert from 'node:assert/strict';
import { execFileSync, spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, test } from 'node:test';
import { createLayerFromTemplate, createWithQemu, ensureTemplate, templatePath } from '../../src/disk/layer-template.js';
import { luksHeaderRange } from '../../src/disk/qcow2/qcow2-format.js';
import { SECRET_FD_OBJECT } from '../../src/qemu/qemu-tools.js';
import { afMerge, afSplit, LuksHeaderError, openLuksSlot, rekeyLuksHeader } from '../../src/disk/luks-header.js';
import { randomBytes } from 'node:crypto';

const dir = mkdtempSync(join(tmpdir(), 'carryon-luks-'));
after(() => rmSync(dir, { recursive: true, force: true }));

/** A qcow2 image made by QEMU itself, with passphrase `pass` (the peer's LUKS header). */
async function qemuImage(name: string, pass: string): Promise<{ header: Buffer; material: Buffer }> {
  const path = join(dir, name);
  await createWithQemu(['create', '-q', '-f', 'qcow2', '--object', SECRET_FD_OBJECT('s'), '-o', 'encrypt.format=luks,encrypt.key-secret=s,encrypt.iter-time=10', path, '1M'], pass);
  return headerOf(path);
}

/** The LUKS header and slot-0 key material of a qcow2 file, found as layer-template.ts finds them. */
async function headerOf(path: string): Promise<{ header: Buffer; material: Buffer }> {
  const range = await luksHeaderRange(path);
  assert.ok(range, 'no LUKS header pointer');
  const header = readFileSync(path).subarray(range.offset, range.offset + range.length);
  return { header, material: header.subarray(header.readUInt32BE(208 + 40) * 512) };
}

const qemuOpen = (path: string, pass: string, cmds: string[]) =>
  spawnSync('qemu-io', ['--object', `secret,id=s,data=${pass}`, ...cmds.flatMap((c) => ['-c', c]), `json:${JSON.stringify({ driver: 'qcow2', file: { driver: 'file', filename: path }, encrypt: { format: 'luks', 'key-secret': 's' }, backing: null })}`], { encoding: 'utf8' });

test('the LUKS1 code opens a header QEMU made (PBKDF2, AF-merge, XTS agree with the peer), and nothing with a wrong passphrase', async () => {
  const { header, material } = await qemuImage('peer.qcow2', 'peer-pass');
  const key = openLuksSlot(header, material, Buffer.from('peer-pass'));
  assert.ok(key);
  assert.equal(key.length, 64);
  assert.equal(openLuksSlot(header, material, Buffer.from('peer-pasS')), null);
});

test('AF split and merge are inverse; split blocks are random', () => {
  const key = randomBytes(64);
  const a = afSplit(key, 4000, 'sha256');
  const b = afSplit(key, 4000, 'sha256');
  assert.equal(a.length, 64 * 4000);
  assert.notDeepEqual(a, b);
  assert.deepEqual(afMerge(a, 64, 4000, 'sha256'), key);
  assert.deepEqual(afMerge(b, 64, 4000, 'sha256'), key);
});

test('re-keying keeps the layout and replaces every secret: new volume key, salts, UUID; only the new passphrase opens it', async () => {
  const { header, material } = await qemuImage('tpl.qcow2', 'template-pass');
  const one = rekeyLuksHeader(header, Buffer.from('pass-one'));
  const two = rekeyLuksHeader(header, Buffer.from('pass-one'));
  const k1 = openLuksSlot(one.header, one.material, Buffer.from('pass-one'));
  const k2 = openLuksSlot(two.header, two.material, Buffer.from('pass-one'));
  assert.ok(k1 && k2);
  assert.notDeepEqual(k1, k2, 'each copy gets its own volume key');
  assert.notDeepEqual(k1, openLuksSlot(header, material, Buffer.from('template-pass')));
  assert.equal(openLuksSlot(one.header, one.material, Buffer.from('template-pass')), null);
  // Layout fields (cipher, hash, payload offset, key bytes, slot offsets, stripes) are the template's.
  assert.deepEqual(one.header.subarray(0, 112), header.subarray(0, 112));
  for (let i = 0; i < 8; i++) assert.deepEqual(one.header.subarray(208 + i * 48 + 40, 208 + i * 48 + 48), header.subarray(208 + i * 48 + 40, 208 + i * 48 + 48));
  assert.notDeepEqual(one.header.subarray(132, 164), two.header.subarray(132, 164), 'digest salt');
  assert.notDeepEqual(one.header.subarray(168, 208), two.header.subarray(168, 208), 'UUID');
  assert.notDeepEqual(one.header.subarray(216, 248), two.header.subarray(216, 248), 'slot salt');
  assert.throws(() => rekeyLuksHeader(Buffer.alloc(592), Buffer.from('x')), LuksHeaderError);
});

test('a layer from a template opens in QEMU with its secret only, reads zeros, keeps writes, passes qemu-img check', async () => {
  const templates = join(dir, 'templates');
  const base = join(dir, 'base.qcow2');
  await createLayerFromTemplate(templates, { kind: 'base', clusterSize: 256 * 1024 }, base, 3 * 2 ** 30 + 512, 'the-disk-secret');
  const info = JSON.parse(execFileSync('qemu-img', ['info', '--output=json', '-U', base], { encoding: 'utf8' })) as { 'virtual-size': number; 'cluster-size': number; encrypted: boolean };
  assert.equal(info['virtual-size'], 3 * 2 ** 30 + 512);
  assert.equal(info['cluster-size'], 256 * 1024);
  assert.equal(info.encrypted, true);
  const ok = qemuOpen(base, 'the-disk-secret', ['read -P 0 0 64k', 'write -P 0x5a 2G 64k', 'read -P 0x5a 2G 64k']);
  assert.equal(ok.status, 0, ok.stderr + ok.stdout);
  assert.doesNotMatch(ok.stdout, /Pattern verification failed/);
  const wrong = qemuOpen(base, 'the-template-secret', ['read 0 4k']);
  assert.notEqual(wrong.status, 0);
  assert.match(wrong.stderr, /Invalid password|cannot unlock/i);
  execFileSync('qemu-img', ['check', '-q', '--object', 'secret,id=s,data=the-disk-secret', `json:${JSON.stringify({ driver: 'qcow2', file: { driver: 'file', filename: base }, encrypt: { format: 'luks', 'key-secret': 's' } })}`]);
  assert.ok(await luksHeaderRange(base));
  // The template's own key material is gone from the copy.
  const tpl = await headerOf(templatePath(templates, { kind: 'base', clusterSize: 256 * 1024 }));
  const copy = await headerOf(base);
  assert.notDeepEqual(copy.material.subarray(0, 256000), tpl.material.subarray(0, 256000));
});

test('templates are made once and checked before use: one with a foreign backing file is replaced', async () => {
  const templates = join(dir, 'templates2');
  const shape = { kind: 'base' as const, clusterSize: 64 * 1024 };
  const path = await ensureTemplate(templates, shape);
  const made = statSync(path).mtimeMs;
  await ensureTemplate(templates, shape);
  assert.equal(statSync(path).mtimeMs, made, 'a good template is reused');
  // A laptop owner swaps in an image that reads through to a file of theirs.
  const evil = join(dir, 'evil.raw');
  writeFileSync(evil, Buffer.alloc(1 << 20, 0x41));
  rmSync(path);
  await createWithQemu(['create', '-q', '-f', 'qcow2', '--object', SECRET_FD_OBJECT('s'), '-o', 'encrypt.format=luks,encrypt.key-secret=s,encrypt.iter-time=10,cluster_size=65536', '-b', evil, '-F', 'raw', path, '1M'], 'x');
  await ensureTemplate(templates, shape);
  const info = JSON.parse(execFileSync('qemu-img', ['info', '--output=json', '-U', path], { encoding: 'utf8' })) as { 'backing-filename'?: string };
  assert.equal(info['backing-filename'], undefined);
  // Read by Carryon's own header parser (no qemu-img info): each of these is not a base template and is made again.
  const bad: [string, string][] = [
    ['unencrypted', 'cluster_size=65536'],
    ['an external data file', `encrypt.format=luks,encrypt.key-secret=s,encrypt.iter-time=10,cluster_size=65536,data_file=${join(dir, 'data.raw')}`],
    ['another cluster size', 'encrypt.format=luks,encrypt.key-secret=s,encrypt.iter-time=10,cluster_size=131072'],
    // Session 13's base template: QEMU 7.2 aborts copy-on-read over subclusters (layer-template.ts).
    ['extended L2 entries (a base template of session 13)', 'encrypt.format=luks,encrypt.key-secret=s,encrypt.iter-time=10,cluster_size=65536,extended_l2=on'],
  ];
  for (const [what, options] of bad) {
    rmSync(path);
    await createWithQemu(['create', '-q', '-f', 'qcow2', '--object', SECRET_FD_OBJECT('s'), '-o', options, path, '1M'], 'x');
    await ensureTemplate(templates, shape);
    const got = JSON.parse(execFileSync('qemu-img', ['info', '--output=json', '-U', path], { encoding: 'utf8' })) as { encrypted?: boolean; 'cluster-size'?: number; 'format-specific'?: { data?: { 'data-file'?: string; 'extended-l2'?: boolean } } };
    const data = got['format-specific']?.data;
    assert.ok(got.encrypted === true && got['cluster-size'] === 65536 && data?.['data-file'] === undefined && data?.['extended-l2'] === false, `a template with ${what} was made again`);
  }
});

test('a parked layer changes passphrase in place: the new one added beside the old (both open it in QEMU, same data), then the old one removed', async () => {
  const { addPassphrase, keepOnlyPassphrase, luksUuid } = await import('../../src/disk/luks-rekey.js');
  const templates = join(dir, 'rekey-templates');
  const path = join(dir, 'parked.qcow2');
  await createLayerFromTemplate(templates, { kind: 'base', clusterSize: 256 * 1024 }, path, 4 << 20, 'old-secret');
  assert.equal(qemuOpen(path, 'old-secret', ['write -P 0x5a 0 256k']).status, 0);
  const uuid = await luksUuid(path);
  await assert.rejects(addPassphrase(path, 'wrong-secret', 'new-secret'), /does not open/);
  await addPassphrase(path, 'old-secret', 'new-secret');
  await addPassphrase(path, 'old-secret', 'new-secret'); // run again after a kill: a no-op
  for (const pass of ['old-secret', 'new-secret']) {
    const r = qemuOpen(path, pass, ['read -P 0x5a 0 256k']);
    assert.equal(r.status, 0, `${pass}: ${r.stderr}`);
    assert.doesNotMatch(r.stdout, /Pattern verification failed/);
  }
  await keepOnlyPassphrase(path, 'new-secret');
  assert.notEqual(qemuOpen(path, 'old-secret', ['read 0 4k']).status, 0, 'the old passphrase no longer opens it');
  // A rerun once the old slot is gone (one slot, the new passphrase's): a no-op, not a refusal.
  await addPassphrase(path, 'old-secret', 'new-secret');
  await assert.rejects(addPassphrase(path, 'wrong-secret', 'other-secret'), /does not open/);
  const r = qemuOpen(path, 'new-secret', ['read -P 0x5a 0 256k']);
  assert.equal(r.status, 0, r.stderr);
  assert.doesNotMatch(r.stdout, /Pattern verification failed/);
  assert.equal(await luksUuid(path), uuid, 'the volume (and its UUID) stays');
  // Again with the slots the other way round (the next hand-over uses the slot this one freed).
  await addPassphrase(path, 'new-secret', 'third-secret');
  await keepOnlyPassphrase(path, 'third-secret');
  assert.equal(qemuOpen(path, 'third-secret', ['read -P 0x5a 0 256k']).status, 0);
  assert.notEqual(qemuOpen(path, 'new-secret', ['read 0 4k']).status, 0);
});

test('each hand-over puts the new passphrase in the slot after the old one (cyclically among 0-5), so its later steps know which slot to open first', async () => {
  const { addedSlot, addPassphrase, keepOnlyPassphrase } = await import('../../src/disk/luks-rekey.js');
  const { slotActive } = await import('../../src/disk/luks-header.js');
  const path = join(dir, 'cycled.qcow2');
  await createLayerFromTemplate(join(dir, 'cycle-templates'), { kind: 'base', clusterSize: 256 * 1024 }, path, 4 << 20, 'secret-0');
  const active = async () => { const { header } = await headerOf(path); return [...Array(8).keys()].filter((s) => slotActive(header, s)); };
  assert.deepEqual(await active(), [0]);
  // Seven hand-overs: 0 → 1 → … → 5 → 0 → 1, the added slot named by addedSlot while both are active.
  for (let i = 1; i <= 7; i++) {
    await addPassphrase(path, `secret-${i - 1}`, `secret-${i}`);
    const want = i % 6;
    assert.equal(addedSlot((await headerOf(path)).header), want, `hand-over ${i}`);
    await keepOnlyPassphrase(path, `secret-${i}`);
    assert.deepEqual(await active(), [want], `hand-over ${i}: only the new passphrase's slot is left`);
  }
  assert.equal(qemuOpen(path, 'secret-7', ['read 0 4k']).status, 0);
});
