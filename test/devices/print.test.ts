import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { createServer, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, test } from 'node:test';
import { RELAY_SCRIPT } from '../../src/devices/print-relay.js';
import { buildQemuCommand, encryptSecret, parseOfflineConfig } from '../../src/hypervisor/launch.js';

// Printing by policy: the relay QEMU's user network runs per guest connection to 10.0.2.100:631
// (stdin/stdout), in front of a stand-in for the host's CUPS socket.
const dir = mkdtempSync(join(tmpdir(), 'carryon-print-'));
after(() => rmSync(dir, { recursive: true, force: true }));

function relay(policyFile: string, socket: string, request: string): Promise<{ code: number | null; out: string }> {
  return new Promise((resolve) => {
    const child = spawn(process.execPath, [RELAY_SCRIPT, policyFile, socket], { stdio: ['pipe', 'pipe', 'ignore'] });
    let out = '';
    child.stdout!.setEncoding('utf8').on('data', (d: string) => (out += d));
    child.once('exit', (code) => resolve({ code, out }));
    child.stdin!.end(request);
  });
}

test('the print relay: allowed → the guest\'s IPP request reaches the host\'s CUPS socket and the answer comes back; printing taken away while running → the next connection finds no path', async () => {
  const got: string[] = [];
  const cups = join(dir, 'cups.sock');
  const server = createServer((s: Socket) => {
    let req = '';
    s.setEncoding('utf8').on('data', (d: string) => {
      req += d;
      if (req.endsWith('\r\n\r\n')) {
        got.push(req);
        s.end('HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n');
      }
    });
  });
  await new Promise<void>((r) => server.listen(cups, r));
  try {
    const policy = join(dir, 'policy.json');
    const job = 'POST /printers/pdf HTTP/1.1\r\nHost: 10.0.2.100:631\r\nContent-Type: application/ipp\r\n\r\n';
    const allowed = await relay(policy, cups, job);
    assert.deepEqual([allowed.code, allowed.out.startsWith('HTTP/1.1 200 OK'), got.length], [0, true, 1], allowed.out);
    writeFileSync(policy, JSON.stringify({ usbAllowed: false, printingAllowed: true }));
    assert.equal((await relay(policy, cups, job)).out.startsWith('HTTP/1.1 200'), true);
    // The agent writes the broker's change while the desktop runs.
    writeFileSync(policy, JSON.stringify({ usbAllowed: false, printingAllowed: false }));
    const denied = await relay(policy, cups, job);
    assert.deepEqual([denied.code, denied.out, got.length], [0, '', 2], 'no connection to CUPS was made');
  } finally {
    server.close();
  }
});

test('the command line: a guestfwd to the relay only where printing is allowed; none otherwise; unsafe relay words refused', () => {
  const host = { cpus: 2, ramBytes: 4 * 2 ** 30, kvm: false };
  const disks = [{ name: 'disk0', blockdev: { driver: 'null-co', 'node-name': 'd0-top' }, secret: encryptSecret('sec-d0', 'c2VjcmV0', Buffer.alloc(32)) }];
  const opts = { name: 'p', qmpSocket: '/r/qmp.sock', guestAgentSocket: '/r/qga.sock', display: 'none' };
  const relayCmd = ['/usr/bin/node', '/opt/carryon/print-relay.js', '/v/d/policy.json', '/run/cups/cups.sock'];
  const on = buildQemuCommand(parseOfflineConfig({ vcpus: 1, ramMiB: 256, printing: true }), host, disks, { ...opts, printRelay: relayCmd }).join(' ');
  assert.ok(on.includes('-nic user,model=virtio-net-pci,guestfwd=tcp:10.0.2.100:631-cmd:/usr/bin/node /opt/carryon/print-relay.js /v/d/policy.json /run/cups/cups.sock '), on);
  assert.doesNotMatch(buildQemuCommand(parseOfflineConfig({ vcpus: 1, ramMiB: 256, printing: true }), host, disks, opts).join(' '), /guestfwd/);
  assert.throws(() => buildQemuCommand(parseOfflineConfig({ vcpus: 1, ramMiB: 256, printing: false }), host, disks, { ...opts, printRelay: relayCmd }), { code: 'policy' });
  assert.throws(() => buildQemuCommand(parseOfflineConfig({ vcpus: 1, ramMiB: 256 }), host, disks, { ...opts, printRelay: relayCmd }), { code: 'policy' }, 'an older check-out (no printing key) gets no printer');
  assert.throws(() => buildQemuCommand(parseOfflineConfig({ vcpus: 1, ramMiB: 256, printing: true }), host, disks, { ...opts, printRelay: ['/a b/node'] }), { code: 'invalid' });
  assert.throws(() => buildQemuCommand(parseOfflineConfig({ vcpus: 1, ramMiB: 256, printing: true }), host, disks, { ...opts, printRelay: ['/a,guestfwd=x'] }), { code: 'invalid' });
});
