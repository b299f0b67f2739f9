import assert from 'node:assert/strict';
import { test } from 'node:test';
import {
  blockSizeInfo, CMD, encodeRequest, exportInfo, exportNameReply, optionReply, OPT, parseGoData, parseRequest, REP, serverHello,
  serverListEntry, simpleReply, TFLAG, transmissionFlags,
} from '../../src/nbd/protocol.js';

function goData(name: string, infos: number[] = []): Buffer {
  const n = Buffer.from(name);
  const b = Buffer.alloc(4 + n.length + 2 + 2 * infos.length);
  b.writeUInt32BE(n.length, 0);
  n.copy(b, 4);
  b.writeUInt16BE(infos.length, 4 + n.length);
  infos.forEach((t, i) => b.writeUInt16BE(t, 6 + n.length + 2 * i));
  return b;
}

test('greeting and option replies have the spec layout', () => {
  const h = serverHello();
  assert.equal(h.subarray(0, 16).toString('latin1'), 'NBDMAGICIHAVEOPT');
  assert.equal(h.readUInt16BE(16), 3);
  const r = optionReply(OPT.GO, REP.ERR_UNSUP, Buffer.from('x'));
  assert.equal(r.readBigUInt64BE(0), 0x3e889045565a9n);
  assert.deepEqual([r.readUInt32BE(8), r.readUInt32BE(12), r.readUInt32BE(16), r.length], [7, 0x80000001, 1, 21]);
  assert.equal(exportNameReply(1 << 20, 3, true).length, 10);
  assert.equal(exportNameReply(1 << 20, 3, false).length, 134);
  assert.deepEqual(serverListEntry('disk0'), Buffer.from([0, 0, 0, 5, ...Buffer.from('disk0')]));
  const info = exportInfo(2 ** 40, 0x1234);
  assert.deepEqual([info.readUInt16BE(0), info.readBigUInt64BE(2), info.readUInt16BE(10)], [0, 2n ** 40n, 0x1234]);
  assert.equal(blockSizeInfo(1, 4096, 1 << 25).readUInt32BE(10), 1 << 25);
});

test('GO/INFO payloads: name and info requests parsed; malformed ones rejected', () => {
  assert.deepEqual(parseGoData(goData('disk0', [3, 1])), { name: 'disk0', infoRequests: [3, 1] });
  assert.deepEqual(parseGoData(goData('')), { name: '', infoRequests: [] });
  assert.equal(parseGoData(Buffer.alloc(3)), null);
  const long = goData('disk0');
  long.writeUInt32BE(1000, 0); // name longer than the payload
  assert.equal(parseGoData(long), null);
  const extra = Buffer.concat([goData('a', [1]), Buffer.from([0])]);
  assert.equal(parseGoData(extra), null);
  const lying = goData('a', [1]);
  lying.writeUInt16BE(5, 5); // claims 5 info requests, carries 1
  assert.equal(parseGoData(lying), null);
});

test('requests round-trip; bad magic is refused; replies carry the handle', () => {
  const b = encodeRequest({ flags: 1, type: CMD.WRITE, handle: 0xdeadbeefn, offset: 2 ** 33, length: 4096 });
  const r = parseRequest(b)!;
  assert.deepEqual([r.flags, r.type, r.handle.readBigUInt64BE(0), r.offset, r.length], [1, CMD.WRITE, 0xdeadbeefn, 2n ** 33n, 4096]);
  b.writeUInt32BE(0x12345678, 0);
  assert.equal(parseRequest(b), null);
  const rep = simpleReply(22, r.handle, Buffer.from('abc'));
  assert.deepEqual([rep.readUInt32BE(0), rep.readUInt32BE(4), rep.readBigUInt64BE(8), rep.length], [0x67446698, 22, 0xdeadbeefn, 19]);
});

test('transmission flags: read-only exports do not offer trim or write-zeroes', () => {
  const rw = transmissionFlags(false);
  const ro = transmissionFlags(true);
  for (const f of [TFLAG.HAS_FLAGS, TFLAG.SEND_FLUSH, TFLAG.SEND_FUA, TFLAG.SEND_TRIM, TFLAG.SEND_WRITE_ZEROES]) assert.ok(rw & f);
  assert.ok(ro & TFLAG.READ_ONLY);
  assert.equal(ro & (TFLAG.SEND_TRIM | TFLAG.SEND_WRITE_ZEROES), 0);
});
