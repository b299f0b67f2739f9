import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import { gatewayBackends, renderHaproxyConfig, serverSetHash } from '../../src/broker/gateway/haproxy.js';
import { parseGateway, transferLabel, transferName, transferRoute } from '../../src/broker/gateway/routes.js';
import { HAPROXY } from '../support/haproxy.js';

const G = parseGateway('gw.example.com:443', 'gw.example.com');

test('--gateway and --gateway-domain are validated: a bad value is a clear bad-config error', () => {
  assert.deepEqual(parseGateway('203.0.113.7:8443', 'Carryon.Example.com.'), { host: '203.0.113.7', port: 8443, domain: 'carryon.example.com' });
  assert.deepEqual(parseGateway('[2001:db8::1]:443', 'gw.example'), { host: '2001:db8::1', port: 443, domain: 'gw.example' });
  assert.deepEqual(parseGateway('gw:443', 'gw.example', '[FD00::2]:8443'), { host: 'gw', port: 443, domain: 'gw.example', brokerBackend: '[fd00::2]:8443' });
  assert.throws(() => parseGateway('gw:443', 'gw.example', 'broker.internal'), (err: Error & { code?: string }) => err.code === 'bad-config' && /--gateway-backend/.test(err.message));
  for (const [address, domain] of [['gw.example.com', 'x.example'], ['gw.example.com:0', 'x.example'], ['gw.example.com:70000', 'x.example'], ['https://gw:443', 'x.example'],
    ['gw_bad!:443', 'x.example'], ['[zz::1]:443', 'x.example'], ['gw:443', undefined], ['gw:443', ''], ['gw:443', 'under_score.example'], ['gw:443', '-a.example'], ['gw:443', '10.0.0.1'],
    ['gw:443', `${'a'.repeat(60)}.${'b'.repeat(60)}.${'c'.repeat(60)}.com`]] as const) {
    assert.throws(() => parseGateway(address, domain), (err: Error & { code?: string }) => err.code === 'bad-config', `${address} ${String(domain)}`);
  }
});

test('every server gets a stable, valid SNI name; ids that are not DNS labels get a digest label', () => {
  assert.equal(transferName(G, 'ts-a'), 'ts-a.transfer.gw.example.com');
  const odd = transferLabel('embedded@host-1:8443');
  assert.match(odd, /^x-[0-9a-f]{20}$/);
  assert.equal(transferLabel('embedded@host-1:8443'), odd, 'stable');
  assert.notEqual(transferLabel('TS-A'), 'TS-A', 'upper case is not taken as is (names are case-insensitive)');
  assert.deepEqual(transferRoute(G, { id: 'ts-a', fingerprint: 'f'.repeat(64) }), { url: 'https://gw.example.com:443', servername: 'ts-a.transfer.gw.example.com', fingerprint: 'f'.repeat(64) });
});

test('the haproxy config routes by SNI in TCP mode with health checks, and haproxy accepts it; its hash follows the server set only', () => {
  const servers = [{ id: 'ts-b', url: 'https://10.0.0.3:9444' }, { id: 'ts-a', url: 'https://10.0.0.3:9443' }, { id: 'embedded@b1:8443', url: 'https://[fd00::2]:9000' }];
  const backends = gatewayBackends(G, 'https://10.0.0.2:8443', servers);
  assert.deepEqual(backends.map((b) => b.id), ['broker', 'embedded@b1:8443', 'ts-a', 'ts-b']);
  const hash = serverSetHash(G, backends);
  assert.equal(serverSetHash(G, gatewayBackends(G, 'https://10.0.0.2:8443', [...servers].reverse())), hash, 'order does not matter');
  assert.notEqual(serverSetHash(G, gatewayBackends(G, 'https://10.0.0.2:8443', servers.slice(1))), hash, 'a server less');
  assert.notEqual(serverSetHash(G, gatewayBackends(G, 'https://10.0.0.2:8443', [{ ...servers[0]!, url: 'https://10.0.0.4:9444' }, ...servers.slice(1)])), hash, 'a server moved');
  const config = renderHaproxyConfig(G, backends, hash, { bind: '127.0.0.1:8443', statsSocket: '/tmp/x.sock' });
  assert.match(config, /mode tcp/);
  assert.match(config, /use_backend be_broker if !\{ req_ssl_sni -m found \}/);
  assert.match(config, /use_backend be_broker if \{ req_ssl_sni -i broker\.gw\.example\.com gw\.example\.com \}/);
  assert.match(config, /use_backend be_t_ts_a if \{ req_ssl_sni -i ts-a\.transfer\.gw\.example\.com \}/);
  assert.match(config, /server transfer \[fd00::2\]:9000 check check-ssl verify none/);
  assert.doesNotMatch(config, /balance|default_backend/, 'haproxy routes, it does not balance');
  assert.throws(() => renderHaproxyConfig(G, backends, hash, { bind: '0.0.0.0:443 ssl crt /x' }), /spaces/);
  assert.throws(() => gatewayBackends(G, 'https://0.0.0.0:8443', []), /--gateway-backend/, 'a wildcard listen address is no backend');
  assert.equal(gatewayBackends({ ...G, brokerBackend: 'broker.internal:8443' }, 'https://0.0.0.0:8443', [])[0]!.address, 'broker.internal:8443');
  assert.throws(() => gatewayBackends(G, 'https://10.0.0.2:8443', [{ id: 'x-1', url: 'https://a:1' }, { id: 'x-1', url: 'https://a:2' }]), /share the gateway name/);
  const dir = mkdtempSync(join(tmpdir(), 'carryon-gwcfg-'));
  try {
    writeFileSync(join(dir, 'haproxy.cfg'), config);
    execFileSync(HAPROXY, ['-c', '-q', '-f', join(dir, 'haproxy.cfg')]);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});
