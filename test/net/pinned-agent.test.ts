import assert from 'node:assert/strict';
import { mkdtempSync, rmSync } from 'node:fs';
import { createServer } from 'node:https';
import type { AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, test } from 'node:test';
import { request } from 'undici';
import { pinnedAgent, probeFingerprint } from '../../src/net/pinned-agent.js';
import { loadOrCreateTls } from '../../src/net/tls-cert.js';

const dir = mkdtempSync(join(tmpdir(), 'carryon-tls-'));
after(() => rmSync(dir, { recursive: true, force: true }));

test('self-signed certificate is created once, pinned by fingerprint, and a wrong pin is refused', async () => {
  const tls = await loadOrCreateTls({ dir });
  assert.equal(tls.created, true);
  const again = await loadOrCreateTls({ dir });
  assert.equal(again.created, false);
  assert.equal(again.fingerprint, tls.fingerprint);

  const server = createServer({ cert: tls.cert, key: tls.key }, (_req, res) => res.end('hello'));
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  after(() => server.close());
  const { port } = server.address() as AddressInfo;

  assert.equal(await probeFingerprint('127.0.0.1', port), tls.fingerprint);

  const good = pinnedAgent(tls.fingerprint);
  const res = await request(`https://127.0.0.1:${port}/`, { dispatcher: good });
  assert.equal(await res.body.text(), 'hello');
  await good.close();

  const bad = pinnedAgent('00'.repeat(32));
  await assert.rejects(request(`https://127.0.0.1:${port}/`, { dispatcher: bad }), /does not match the pinned/);
  await bad.close();
});
