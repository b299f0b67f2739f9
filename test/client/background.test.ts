import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { test } from 'node:test';

// `carryon replicate --background` (the agent's scheduled replicas: client/background.ts) lowers
// every thread of its process: on Linux nice is a thread's, and the sender's work runs on several.
const moduleUrl = new URL('../../src/client/background.js', import.meta.url).href;
const script = `
  import { readdirSync, readFileSync } from 'node:fs';
  import { Worker } from 'node:worker_threads';
  import { lowerOwnPriority } from ${JSON.stringify(moduleUrl)};
  const w = new Worker('setInterval(() => {}, 1000)', { eval: true });
  await new Promise((r) => w.once('online', r));
  await Promise.all([1, 2, 3, 4].map(() => import('node:fs/promises').then((f) => f.stat('/'))));
  lowerOwnPriority();
  const later = new Worker('setInterval(() => {}, 1000)', { eval: true });
  await new Promise((r) => later.once('online', r));
  const nice = readdirSync('/proc/self/task').map((t) => Number(readFileSync('/proc/self/task/' + t + '/stat', 'utf8').split(') ')[1].split(' ')[16]));
  console.log(JSON.stringify(nice));
  process.exit(0);
`;

const niceOfThreads = (prefix: string[] = []): number[] => {
  const [cmd, ...args] = [...prefix, process.execPath, '--input-type=module', '-e', script];
  return JSON.parse(execFileSync(cmd!, args, { encoding: 'utf8' })) as number[];
};

test('a background replica\'s process runs every thread at nice 15, those made before and after; a lower priority stays', { skip: process.platform !== 'linux' && 'nice per thread is Linux\'s' }, () => {
  const nice = niceOfThreads();
  assert.ok(nice.length >= 4, `several threads seen (${nice.length})`);
  assert.deepEqual([...new Set(nice)], [15], `every thread at nice 15: ${JSON.stringify(nice)}`);
  assert.deepEqual([...new Set(niceOfThreads(['nice', '-n', '19']))], [19], 'never raised');
});
