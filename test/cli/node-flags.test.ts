import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { test } from 'node:test';
import { LAUNCHER_ENV_ASSIGNMENTS, NODE_FLAGS } from '../../src/core/runtime/node-flags.js';
import { writeLauncher } from '../../src/client/update.js';

test('the carryon launcher starts Node with the same V8 flags the bench and the spawned servers use', () => {
  const main = fileURLToPath(new URL('../../src/cli/main.js', import.meta.url));
  const shebang = readFileSync(main, 'utf8').split('\n')[0];
  const start = `${LAUNCHER_ENV_ASSIGNMENTS.join(' ')} node ${NODE_FLAGS.join(' ')}`;
  assert.equal(shebang, `#!/usr/bin/env -S ${start}`);
  const scripts = JSON.parse(readFileSync(fileURLToPath(new URL('../../../package.json', import.meta.url)), 'utf8')).scripts as Record<string, string>;
  for (const name of ['demo', 'bench']) assert.ok(scripts[name]!.includes(`${start} `), `npm run ${name} runs ${start}`);
});

test('the launcher a client update installs starts Node with the same environment and flags', async () => {
  const root = await mkdtemp(join(tmpdir(), 'carryon-launcher-'));
  try {
    await writeLauncher(root);
    const text = await readFile(join(root, 'bin', 'carryon'), 'utf8');
    const execs = text.split('\n').filter((l) => l.includes('exec '));
    assert.equal(execs.length, 2);
    for (const line of execs) assert.match(line, new RegExp(`exec env ${LAUNCHER_ENV_ASSIGNMENTS.join(' ')} "\\$\\{CARRYON_NODE:-[^}]+\\}" ${NODE_FLAGS.join(' ')} "\\$cli/`));
  } finally {
    await rm(root, { recursive: true, force: true });
  }
});
