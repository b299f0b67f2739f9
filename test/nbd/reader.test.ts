import assert from 'node:assert/strict';
import { test } from 'node:test';
import { ByteQueue } from '../../src/nbd/reader.js';

test('byte queue: reads within one piece are views, reads across pieces are joined once', () => {
  const q = new ByteQueue();
  const a = Buffer.from('abcdef');
  q.push(a);
  q.push(Buffer.from('gh'));
  q.push(Buffer.from('ijkl'));
  assert.equal(q.length, 12);
  const head = q.take(4);
  assert.equal(head.toString(), 'abcd');
  assert.equal(head.buffer, a.buffer, 'a read inside one piece is not copied');
  assert.equal(q.take(0).length, 0);
  assert.equal(q.take(6).toString(), 'efghij');
  assert.equal(q.length, 2);
  assert.equal(q.take(2).toString(), 'kl');
  assert.equal(q.length, 0);
});
