import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { createServer, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, test } from 'node:test';
import { RELAY_SCRIPT } from '../../src/devices/print-relay.js';
import { LocalHostRewriter } from '../../src/devices/host-header.js';
import { cupsSkip, ippPrintJob, startCups } from '../support/cups.js';
import { buildQemuCommand, encryptSecret, parseOfflineConfig } from '../../src/hypervisor/launch.js';

// Printing by policy: the relay QEMU's user network runs per guest connection to 10.0.2.100:631
// (stdin/stdout), in front of a stand-in for the host's CUPS socket.
const dir = mkdtempSync(join(tmpdir(), 'carryon-print-'));
after(() => rmSync(dir, { recursive: true, force: true }));

function relay(policyFile: string, socket: string, request: string | Buffer): Promise<{ code: number | null; out: string }> {
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
      // The head and the 4-byte IPP header of the body.
      if (req.includes('\r\n\r\n') && req.length >= req.indexOf('\r\n\r\n') + 8) {
        got.push(req);
        s.end('HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n');
      }
    });
  });
  await new Promise<void>((r) => server.listen(cups, r));
  try {
    const policy = join(dir, 'policy.json');
    const job = 'POST /printers/pdf HTTP/1.1\r\nHost: 10.0.2.100:631\r\nContent-Type: application/ipp\r\nContent-Length: 4\r\n\r\n\x01\x01\x00\x02';
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

/** What the rewriter makes of `input`, fed to it in pieces of `step` bytes (a request may arrive split anywhere). */
async function rewritten(input: Buffer, step: number): Promise<string> {
  const r = new LocalHostRewriter();
  const out: Buffer[] = [];
  r.on('data', (d: Buffer) => out.push(d));
  const ended = new Promise<void>((resolve, reject) => {
    r.once('end', resolve);
    r.once('error', reject);
  });
  for (let i = 0; i < input.length; i += step) r.write(input.subarray(i, i + step));
  r.end();
  await ended;
  return Buffer.concat(out).toString('latin1');
}

test('the relay makes each request\'s Host localhost (CUPS refuses any other on its socket): kept-alive requests, Content-Length and chunked bodies pass byte for byte; an Upgrade is dropped; anything but a print operation POSTed to a print resource, or a stream that is not HTTP, ends the connection before it reaches CUPS', async () => {
  // A body that looks like a request head: only the framing may decide where a body ends.
  // Bodies begin with an IPP header (version 1.1, then the operation): Print-Job, Send-Document, CUPS-Get-Printers.
  const body1 = '\x01\x01\x00\x02Host: evil\r\n\r\nGET / HTTP/1.1\r\n\r\n';
  const chunks = ['2\r\n\x01\x01\r\n', '5\r\n\x00\x06st:\r\n', '10;ext=1\r\n0123456789abcdef\r\n', '0\r\nX-Trailer: 1\r\n\r\n'];
  const input = [
    `POST /printers/carryon HTTP/1.1\r\nHost: 10.0.2.100:631\r\nContent-Type: application/ipp\r\nContent-Length: ${body1.length}\r\n\r\n${body1}`,
    'POST /printers/carryon HTTP/1.1\r\nHOST:10.0.2.100\r\nTransfer-Encoding: chunked\r\nUpgrade: TLS/1.2\r\n\r\n', ...chunks,
    'POST / HTTP/1.0\r\nContent-Length: 4\r\n\r\n\x02\x00\x40\x02',
  ].join('');
  const want = [
    `POST /printers/carryon HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/ipp\r\nContent-Length: ${body1.length}\r\n\r\n${body1}`,
    'POST /printers/carryon HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n', ...chunks,
    'POST / HTTP/1.0\r\nHost: localhost\r\nContent-Length: 4\r\n\r\n\x02\x00\x40\x02',
  ].join('');
  for (const step of [1, 7, input.length]) assert.equal(await rewritten(Buffer.from(input, 'latin1'), step), want, `fed ${step} bytes at a time`);
  await assert.rejects(rewritten(Buffer.from('\x16\x03\x01 TLS hello\r\n\r\n', 'latin1'), 64), /not an HTTP/);
  // CUPS takes the relay as this laptop's user: its admin side (pages, config) is not for the guest.
  for (const line of ['PUT /admin/conf/cupsd.conf HTTP/1.1', 'POST /admin/ HTTP/1.1', 'GET /admin/log/error_log HTTP/1.1', 'GET /printers/carryon HTTP/1.1', 'POST /printers/../admin/ HTTP/1.1', 'POST http://10.0.2.100/admin/ HTTP/1.1']) {
    await assert.rejects(rewritten(Buffer.from(`${line}\r\nHost: 10.0.2.100\r\nContent-Length: 0\r\n\r\n`, 'latin1'), 64), /not a print request/, line);
  }
  // Nor the printer's administration on a print resource: Pause-Printer, Purge-Jobs, CUPS-Add-Modify-Printer (also split across chunks).
  for (const op of ['\x00\x10', '\x00\x12', '\x40\x03']) {
    const ok = 'POST /printers/carryon HTTP/1.1\r\nContent-Length: 4\r\n\r\n\x01\x01\x00\x0b';
    for (const bad of [`POST /printers/carryon HTTP/1.1\r\nContent-Length: 8\r\n\r\n\x01\x01${op}\x00\x00\x00\x01`, `POST /printers/carryon HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n\x01\x01${op[0]}\r\n1\r\n${op[1]}\r\n0\r\n\r\n`]) {
      const out: string[] = [];
      const r = new LocalHostRewriter();
      r.on('data', (d: Buffer) => out.push(d.toString('latin1')));
      const failed = new Promise<Error>((resolve) => r.once('error', resolve));
      r.write(Buffer.from(ok + bad, 'latin1'));
      assert.match((await failed).message, /not a print operation/);
      assert.equal(out.join(''), ok.replace('HTTP/1.1\r\n', 'HTTP/1.1\r\nHost: localhost\r\n'), 'the request before it went through; nothing of the refused one did');
    }
  }
  await assert.rejects(rewritten(Buffer.from('POST /printers/carryon HTTP/1.1\r\nContent-Length: 2\r\n\r\n\x01\x01', 'latin1'), 64), /without its header/);
  await assert.rejects(rewritten(Buffer.from('POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n', 'latin1'), 64), /chunk size/);
});

test('a job through the relay arrives in a real CUPS (a private cupsd on a temp socket): the Print-Job a guest sends, Host 10.0.2.100:631 and all', { skip: cupsSkip }, async () => {
  const cups = await startCups(join(dir, 'cups'));
  try {
    const doc = Buffer.from('%!PS\n% a page from the guest\nshowpage\n');
    const ipp = ippPrintJob(`ipp://10.0.2.100:631/printers/${cups.queue}`, doc, { user: 'guest-alice' });
    const head = `POST /printers/${cups.queue} HTTP/1.1\r\nHost: 10.0.2.100:631\r\nContent-Type: application/ipp\r\nContent-Length: ${ipp.length}\r\nConnection: close\r\n\r\n`;
    const answer = await relay(join(dir, 'none.json'), cups.socket, Buffer.concat([Buffer.from(head), ipp]));
    assert.match(answer.out, /^HTTP\/1\.1 200 OK/, answer.out.slice(0, 200));
    // IPP status successful-ok (0x0000) right after the version, in the answer's body.
    const body = Buffer.from(answer.out.slice(answer.out.indexOf('\r\n\r\n') + 4), 'latin1');
    assert.equal(body.readUInt16BE(2), 0, `IPP status ${body.readUInt16BE(2).toString(16)}`);
    const jobs = await cups.jobs();
    assert.deepEqual(jobs.map((j) => [j.user, j.document.toString()]), [['guest-alice', doc.toString()]]);
  } finally {
    await cups.stop();
  }
});
