import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { test } from 'node:test';
import { spawn } from 'node:child_process';
import { BackgroundReplicas, stopChild } from '../../src/client/background.js';

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
  const lowered = lowerOwnPriority();
  const later = new Worker('setInterval(() => {}, 1000)', { eval: true });
  await new Promise((r) => later.once('online', r));
  // stat after the command's name: field 19 is nice, field 41 the scheduling policy (5: SCHED_IDLE).
  const fields = readdirSync('/proc/self/task').map((t) => readFileSync('/proc/self/task/' + t + '/stat', 'utf8').split(') ')[1].split(' '));
  console.log(JSON.stringify({ nice: fields.map((f) => Number(f[16])), policy: fields.map((f) => Number(f[38])), idle: lowered.idle }));
  process.exit(0);
`;

const threadsOf = (prefix: string[] = []): { nice: number[]; policy: number[]; idle: boolean } => {
  const [cmd, ...args] = [...prefix, process.execPath, '--input-type=module', '-e', script];
  return JSON.parse(execFileSync(cmd!, args, { encoding: 'utf8' })) as { nice: number[]; policy: number[]; idle: boolean };
};

const SCHED_IDLE = 5;

test('a background replica\'s process runs every thread at nice 15 and SCHED_IDLE, those made before and after; a lower priority stays', { skip: process.platform !== 'linux' && 'nice per thread is Linux\'s' }, () => {
  const { nice, policy, idle } = threadsOf();
  assert.ok(nice.length >= 4, `several threads seen (${nice.length})`);
  assert.deepEqual([...new Set(nice)], [15], `every thread at nice 15: ${JSON.stringify(nice)}`);
  assert.equal(idle, true, 'chrt (util-linux) set the idle class');
  assert.deepEqual([...new Set(policy)], [SCHED_IDLE], `every thread in SCHED_IDLE: ${JSON.stringify(policy)}`);
  assert.deepEqual([...new Set(threadsOf(['nice', '-n', '19']).nice)], [19], 'never raised');
});

test('the agent\'s replicas in flight: one per desktop, not awaited by the heartbeat; a command stops its desktop\'s replica and waits for its end; failures are logged', async () => {
  const logs: string[] = [];
  const replicas = new BackgroundReplicas((l) => logs.push(l));
  let release!: () => void;
  const slow = new Promise<void>((r) => (release = r));
  const events: string[] = [];
  // A replica that runs until released or stopped (as the child ends on SIGTERM).
  const replicate = (name: string) => (signal: AbortSignal) => new Promise<void>((resolve, reject) => {
    events.push(`start ${name}`);
    signal.addEventListener('abort', () => setTimeout(() => { events.push(`stopped ${name}`); reject(new Error('SIGTERM')); }, 20), { once: true });
    void slow.then(() => { events.push(`done ${name}`); resolve(); });
  });
  assert.equal(replicas.start('d1', 'desk-1', replicate('d1')), true);
  assert.equal(replicas.start('d1', 'desk-1', replicate('d1 again')), false, 'a second one for the same desktop waits for the next heartbeat');
  assert.equal(replicas.start('d2', 'desk-2', replicate('d2')), true);
  await replicas.stop('d1');
  assert.deepEqual(events, ['start d1', 'start d2', 'stopped d1'], 'the stop waited for the replica\'s end');
  assert.equal(replicas.has('d1'), false);
  assert.deepEqual(logs, ['scheduled replication of desk-1 stopped']);
  assert.equal(replicas.has('d2'), true);
  release();
  await replicas.drain();
  assert.equal(replicas.has('d2'), false);
  assert.ok(replicas.start('d3', 'desk-3', async () => { throw new Error('the broker refused'); }));
  await replicas.drain();
  assert.deepEqual(logs.slice(1), ['scheduled replication of desk-3 failed: the broker refused']);
});

test('a background replica that does not end on SIGTERM is killed after the grace time; one that does is not', async () => {
  const start = (script: string) => {
    const child = spawn(process.execPath, ['-e', script], { stdio: ['ignore', 'pipe', 'ignore'] });
    return new Promise<typeof child>((r) => child.stdout!.once('data', () => r(child)));
  };
  const deaf = await start(`process.on('SIGTERM', () => {}); console.log('up'); setInterval(() => {}, 1000);`);
  const t0 = Date.now();
  const bounded = new Promise<never>((_, reject) => setTimeout(() => reject(new Error('still running 5 s after the stop')), 5000).unref());
  try {
    await Promise.race([stopChild(deaf, 300), bounded]);
  } finally {
    deaf.kill('SIGKILL');
  }
  assert.equal(deaf.signalCode, 'SIGKILL');
  assert.ok(Date.now() - t0 >= 250, 'it had its grace time');
  const polite = await start(`process.on('SIGTERM', () => process.exit(0)); console.log('up'); setInterval(() => {}, 1000);`);
  await stopChild(polite, 5000);
  assert.deepEqual([polite.exitCode, polite.signalCode], [0, null]);
});
