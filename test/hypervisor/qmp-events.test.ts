import assert from 'node:assert/strict';
import { mkdtemp, rm } from 'node:fs/promises';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import { blockIoErrorLine } from '../../src/hypervisor/launch.js';
import { QmpConnection, type QmpEvent } from '../../src/qemu/qmp.js';

test('QMP events reach a listener as they arrive (and waitEvent still sees them); a block I/O error is said with its layer and reason', async () => {
  const dir = await mkdtemp(join(tmpdir(), 'carryon-qmp-'));
  const path = join(dir, 'qmp.sock');
  // A QEMU stand-in: greeting, capabilities, then two events after the next command.
  const server = createServer((sock) => {
    sock.write('{"QMP": {"version": {}, "capabilities": []}}\n');
    let commands = 0;
    sock.on('data', () => {
      sock.write('{"return": {}}\n');
      if (++commands < 2) return; // the events follow the first command after the handshake
      sock.write('{"event": "BLOCK_IO_ERROR", "data": {"device": "", "node-name": "d0-top-g2", "operation": "write", "action": "report", "nospace": false, "reason": "Input/output error"}}\n');
      sock.write('{"event": "RESUME"}\n');
    });
  });
  await new Promise<void>((r) => server.listen(path, r));
  const seen: QmpEvent[] = [];
  const qmp = await QmpConnection.open(path);
  try {
    qmp.onEvent('BLOCK_IO_ERROR', (e) => seen.push(e));
    await qmp.execute('query-status');
    const resumed = await qmp.waitEvent((e) => e.event === 'RESUME', 5_000);
    assert.equal(resumed.event, 'RESUME');
    assert.equal(seen.length, 1, 'the listener heard the I/O error, not the other event');
    assert.equal(blockIoErrorLine(seen[0]!), 'QEMU: a guest write on d0-top-g2 failed (Input/output error); the guest was told (action: report)');
    assert.ok(qmp.sawEvent('BLOCK_IO_ERROR'));
    assert.match(blockIoErrorLine({ event: 'BLOCK_IO_ERROR', data: { device: 'virtio0', operation: 'read', action: 'stop', nospace: true, reason: 'No space left on device' } }), /read on virtio0 failed \(No space left on device, no space left on the host\); the guest was told \(action: stop\)/);
  } finally {
    qmp.close();
    server.close();
    await rm(dir, { recursive: true, force: true });
  }
});
