import assert from 'node:assert/strict';
import { execFile, execFileSync } from 'node:child_process';
import { mkdtempSync, readFileSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { after, before, test } from 'node:test';
import { request } from 'undici';
import { pinnedAgent } from '../../src/net/pinned-agent.js';
import type { RunningBroker } from '../../src/broker/start.js';
import { ADMIN, api, cleanup, makeImage, testBroker, type Api } from './harness.js';

const run = promisify(execFile);
let broker: RunningBroker & { dir: string };
let http: Api;
let token: string;

before(async () => {
  broker = await testBroker();
  http = api(broker.url, broker.fingerprint);
  token = await http.login(ADMIN.name, ADMIN.password);
});
after(async () => {
  await http.close();
  await broker.close();
  cleanup(broker.dir);
});

test('background import: 202 with a job, progress to done, the desktop exists; names and bad images refused at once', async () => {
  const image = makeImage(broker.dir, 24, 'big.raw');
  const started = await http.call('POST', '/v1/admin/desktops', { name: 'bg', image, background: true }, token);
  assert.equal(started.status, 202);
  let job = started.body.import as { id: string; state: string; bytesTotal: number; result: { id: string } | null };
  assert.equal(job.bytesTotal, 24 * 1024 * 1024);
  for (let i = 0; i < 200 && job.state === 'running'; i++) {
    await new Promise((r) => setTimeout(r, 25));
    job = (await http.call('GET', `/v1/admin/imports/${job.id}`, undefined, token)).body.import as typeof job;
  }
  assert.equal(job.state, 'done');
  const shown = await http.call('GET', '/v1/admin/desktops/bg', undefined, token);
  assert.equal(shown.body.id, job.result!.id);
  assert.equal((await http.call('GET', '/v1/admin/imports', undefined, token)).body.imports instanceof Array, true);
  const again = await http.call('POST', '/v1/admin/desktops', { name: 'bg', image, background: true }, token);
  assert.deepEqual([again.status, again.body.error], [409, 'exists']);
  const missing = await http.call('POST', '/v1/admin/desktops', { name: 'nope', image: join(broker.dir, 'absent.qcow2'), background: true }, token);
  assert.equal(missing.status, 404);
  // A qcow2 cut short: refused at once, or failed in the background with QEMU's reason; no desktop.
  const junk = join(broker.dir, 'junk.qcow2');
  execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', junk, '64M']);
  execFileSync('qemu-io', ['-f', 'qcow2', '-c', 'write -P 7 0 8M', junk]);
  writeFileSync(junk, readFileSync(junk).subarray(0, 300_000));
  const bad = await http.call('POST', '/v1/admin/desktops', { name: 'junk', image: junk, background: true }, token);
  if (bad.status === 202) {
    let j = bad.body.import as { id: string; state: string; error: { message: string } | null };
    for (let i = 0; i < 200 && j.state === 'running'; i++) {
      await new Promise((r) => setTimeout(r, 25));
      j = (await http.call('GET', `/v1/admin/imports/${j.id}`, undefined, token)).body.import as typeof j;
    }
    assert.equal(j.state, 'failed');
    assert.ok(j.error && j.error.message.length > 0);
  } else assert.equal(bad.status, 400);
  assert.equal((await http.call('GET', '/v1/admin/desktops/junk', undefined, token)).status, 404);
  assert.equal((await http.call('GET', '/v1/admin/imports/unknown', undefined, token)).status, 404);
});

test('carryon admin desktops create polls the import and prints the new desktop', async () => {
  const image = makeImage(broker.dir, 8, 'cli.raw');
  const env = { ...process.env, CARRYON_URL: broker.url, CARRYON_FINGERPRINT: broker.fingerprint, CARRYON_USER: ADMIN.name, CARRYON_PASSWORD: ADMIN.password };
  const cli = join(process.cwd(), 'dist', 'src', 'cli', 'main.js');
  const { stdout } = await run(process.execPath, [cli, 'admin', 'desktops', 'create', 'from-cli', image, '--vcpus', '1', '--json'], { env });
  const res = JSON.parse(stdout) as { id: string; chunksStored: number };
  assert.ok(res.id && res.chunksStored > 0);
  const bad = await run(process.execPath, [cli, 'admin', 'desktops', 'create', 'x', image, '--vcpus', 'two'], { env }).catch((e: { stderr: string; code: number }) => e);
  assert.match((bad as { stderr: string }).stderr, /--vcpus must be a positive whole number/);
});

test('an image that reads files outside itself (backing file, json: backing, external data file, VMDK extent) is refused, by path and by upload', async () => {
  // The secret lies outside the import directory; each image below would show it to the guest.
  const outside = mkdtempSync(join(tmpdir(), 'carryon-outside-'));
  const secret = join(outside, 'secret.raw');
  const secretBytes = Buffer.alloc(1 << 20, 0x5a);
  writeFileSync(secret, secretBytes);
  const img = (name: string, ...args: string[]) => {
    const path = join(broker.dir, name);
    execFileSync('qemu-img', ['create', '-q', ...args.map((a) => a.replace('IMG', path))]);
    return path;
  };
  const flat = img('flat.vmdk', '-f', 'vmdk', '-o', 'subformat=monolithicFlat', 'IMG', '1M');
  writeFileSync(flat, readFileSync(flat, 'utf8').replace(/"flat-flat\.vmdk"/, JSON.stringify(secret)));
  const images = {
    backing: img('backing.qcow2', '-f', 'qcow2', '-b', secret, '-F', 'raw', 'IMG'),
    json: img('json.qcow2', '-f', 'qcow2', '-F', 'raw', '-b', `json:${JSON.stringify({ driver: 'raw', file: { driver: 'file', filename: secret } })}`, 'IMG', '1M'),
    // A data file of its own (qemu-img create writes it), then pointed at the secret by its header.
    data: img('data.qcow2', '-f', 'qcow2', '-o', `data_file=${join(outside, 'data.raw')},data_file_raw=on`, 'IMG', '1M'),
    flat,
  };
  const header = readFileSync(images.data);
  const at = header.indexOf(join(outside, 'data.raw'));
  header.write(secret.padEnd(join(outside, 'data.raw').length, '\0'), at);
  writeFileSync(images.data, header);
  try {
    for (const [kind, image] of Object.entries(images)) {
      const r = await http.call('POST', '/v1/admin/desktops', { name: `escape-${kind}`, image }, token);
      assert.deepEqual([r.status, r.body.error], [400, 'image-names-other-files'], `${kind}: ${JSON.stringify(r.body)}`);
      assert.match(String(r.body.message), /self-contained/);
      assert.equal((await http.call('GET', `/v1/admin/desktops/escape-${kind}`, undefined, token)).status, 404);
    }
    // The upload route imports through the same checks.
    // Padded to more than one chunk (trailing bytes mean nothing to qcow2): the upload checks its size first.
    const head = readFileSync(images.backing);
    const bytes = Buffer.concat([head, Buffer.alloc(512 * 1024 + ((512 - (head.length % 512)) % 512))]);
    const up = await http.call('POST', '/v1/admin/uploads', { name: 'b.qcow2', sizeBytes: bytes.length }, token);
    const agent = pinnedAgent(broker.fingerprint);
    try {
      const put = await request(`${broker.url}/v1/admin/uploads/${String(up.body.id)}?offset=0`, { method: 'PUT', dispatcher: agent, headers: { 'content-type': 'application/octet-stream', authorization: `Bearer ${token}` }, body: bytes });
      const done = (await put.body.json()) as { complete: boolean };
      assert.equal(done.complete, true, `${JSON.stringify(up.body)} ${JSON.stringify(done)}`);
    } finally {
      await agent.close();
    }
    const imported = await http.call('POST', `/v1/admin/uploads/${String(up.body.id)}/import`, { name: 'escape-upload' }, token);
    assert.deepEqual([imported.status, imported.body.error], [400, 'image-names-other-files'], JSON.stringify(imported.body));
    assert.equal((await http.call('GET', '/v1/admin/desktops/escape-upload', undefined, token)).status, 404);
  } finally {
    cleanup(outside);
  }
});
