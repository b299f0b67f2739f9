import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { appendFileSync, mkdtempSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import { PushJournal } from '../../src/live/disks/push-journal.js';

const fp = () => randomBytes(32).toString('hex');
const id = () => randomBytes(32).toString('hex');
const name = () => ({ id: id(), receipt: randomBytes(16).toString('base64url') });

test('push journal: names and their push receipts survive a reopen; a torn tail and unknown records are skipped, never read as names', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'carryon-journal-'));
  try {
    const path = join(dir, 'pushed.journal');
    const j = await PushJournal.open(path);
    const [a, b, c] = [fp(), fp(), fp()];
    const named = name();
    await j.add([{ fingerprint: a, name: named }, { fingerprint: b, name: null }]);
    assert.deepEqual(j.get(a), named);
    await j.close();
    assert.equal(statSync(path).mode & 0o777, 0o600);

    // A record whose kind byte is neither 0 nor 1, then half a record (a kill mid-write).
    const odd = Buffer.alloc(81, 0);
    Buffer.from(c, 'hex').copy(odd);
    odd[32] = 7;
    appendFileSync(path, Buffer.concat([odd, Buffer.from(fp(), 'hex')]));
    const again = await PushJournal.open(path);
    assert.deepEqual(again.get(a), named, 'the receipt comes back with the name');
    assert.equal(again.get(b), null, 'a hole is a name too');
    assert.equal(again.get(c), undefined);
    assert.equal(again.get(fp()), undefined);
    // Records appended after a torn tail are found: the tail is cut off at the next open.
    await again.add([{ fingerprint: c, name: named }]);
    await again.close();
    assert.equal(statSync(path).size, 4 * 81);
    const third = await PushJournal.open(path);
    assert.deepEqual(third.get(c), named);
    await third.remove();
    assert.throws(() => statSync(path), /ENOENT/);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});
