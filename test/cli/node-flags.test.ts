import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { test } from 'node:test';
import { NODE_FLAGS } from '../../src/cli/node-flags.js';

test('the carryon launcher starts Node with the same V8 flags the bench and the spawned servers use', () => {
  const main = fileURLToPath(new URL('../../src/cli/main.js', import.meta.url));
  const shebang = readFileSync(main, 'utf8').split('\n')[0];
  assert.equal(shebang, `#!/usr/bin/env -S node ${NODE_FLAGS.join(' ')}`);
  const scripts = JSON.parse(readFileSync(fileURLToPath(new URL('../../../package.json', import.meta.url)), 'utf8')).scripts as Record<string, string>;
  for (const name of ['demo', 'bench']) assert.ok(scripts[name]!.includes(`node ${NODE_FLAGS.join(' ')} `), `npm run ${name} runs Node with ${NODE_FLAGS.join(' ')}`);
});
