import assert from 'node:assert/strict';
import { existsSync, mkdirSync, mkdtempSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, test } from 'node:test';
import { Vault } from '../../src/client/vault/vault.js';

const home = mkdtempSync(join(tmpdir(), 'carryon-trash-'));
after(() => rmSync(home, { recursive: true, force: true }));

async function emptied(dir: string): Promise<boolean> {
  for (let i = 0; i < 200; i++) {
    if (!existsSync(dir) || readdirSync(dir).length === 0) return true;
    await new Promise((r) => setTimeout(r, 25));
  }
  return false;
}

test('a wiped desktop leaves the vault at once; its erased files are freed in the background, a leftover at the next open', async () => {
  const vault = await Vault.open(home);
  const dir = vault.desktopDir('d1');
  mkdirSync(join(dir, 'disks', 'disk0'), { recursive: true });
  writeFileSync(join(dir, 'state.json'), '{"secret":"x"}');
  writeFileSync(join(dir, 'disks', 'disk0', 'base.qcow2'), Buffer.alloc(1 << 20, 1));
  await vault.wipe('d1');
  assert.equal(existsSync(dir), false, 'gone from the vault when wipe returns');
  // Little left: removed by the wipe itself, nothing waits in the trash.
  assert.deepEqual(readdirSync(join(home, 'trash')), []);

  // Layers that take 4 MiB or more: freed by a process of its own.
  mkdirSync(join(dir, 'disks', 'disk0'), { recursive: true });
  writeFileSync(join(dir, 'state.json'), '{"secret":"x"}');
  writeFileSync(join(dir, 'disks', 'disk0', 'base.qcow2'), Buffer.alloc(4 << 20, 1));
  await vault.wipe('d1');
  assert.equal(existsSync(dir), false, 'gone from the vault when wipe returns');
  assert.ok(await emptied(join(home, 'trash')), 'the trash empties on its own');

  // A kill between the rename and the removal leaves a trash entry: the next open sweeps it.
  mkdirSync(join(home, 'trash', 'd2.1.abcd', 'disks'), { recursive: true });
  writeFileSync(join(home, 'trash', 'd2.1.abcd', 'disks', 'x'), 'ciphertext');
  await Vault.open(home);
  assert.ok(await emptied(join(home, 'trash')));
});
