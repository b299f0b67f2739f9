import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { appendFileSync, mkdtempSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import { PushJournal } from '../../src/client/push-journal.js';

const fp = () => randomBytes(32).toString('hex');
const id = () => randomBytes(32).toString('hex');

test('push journal: names survive a reopen; a torn tail and unknown records are skipped, never read as names', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'carryon-journal-'));
  try {
    const path = join(dir, 'pushed.journal');
    const j = await PushJournal.open(path);
    const [a, b, c] = [fp(), fp(), fp()];
    const named = id();
    await j.add([{ fingerprint: a, id: named }, { fingerprint: b, id: null }]);
    assert.equal(j.get(a), named);
    await j.close();
    assert.equal(statSync(path).mode & 0o777, 0o600);

    // A record whose kind byte is neither 0 nor 1, then half a record (a kill mid-write).
    const odd = Buffer.alloc(65, 0);
    Buffer.from(c, 'hex').copy(odd);
    odd[32] = 7;
    appendFileSync(path, Buffer.concat([odd, Buffer.from(fp(), 'hex')]));
    const again = await PushJournal.open(path);
    assert.equal(again.get(a), named);
    assert.equal(again.get(b), null, 'a hole is a name too');
    assert.equal(again.get(c), undefined);
    assert.equal(again.get(fp()), undefined);
    // Records appended after a torn tail are found: the tail is cut off at the next open.
    await again.add([{ fingerprint: c, id: named }]);
    await again.close();
    assert.equal(statSync(path).size, 4 * 65);
    const third = await PushJournal.open(path);
    assert.equal(third.get(c), named);
    await third.remove();
    assert.throws(() => statSync(path), /ENOENT/);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});
