import assert from 'node:assert/strict';
import { createHmac, randomBytes, timingSafeEqual } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import { connect } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, test } from 'node:test';
import { CarryonError } from '../../src/core/errors.js';
import { ControlClient, serveControl, type ControlHandler, type ControlKey } from '../../src/live/control.js';

const dir = mkdtempSync(join(tmpdir(), 'carryon-control-'));
after(() => rmSync(dir, { recursive: true, force: true }));

function keyOf(secret: Buffer): ControlKey {
  const mac = (data: string) => createHmac('sha256', secret).update(data).digest('hex');
  return { sign: mac, verify: (data, m) => m.length === 64 && timingSafeEqual(Buffer.from(mac(data), 'hex'), Buffer.from(m, 'hex')) };
}

function fakeHolder() {
  const calls: string[] = [];
  const handler: ControlHandler = {
    async freeze() {
      calls.push('freeze');
      return { id: '0123456789abcdef', kind: 'crash-consistent', pausedMs: 1, socketPath: '/x.sock', disks: [] };
    },
    async fold(id, _digests, opts) { calls.push(`fold ${id}${opts?.background ? ' background' : ''}`); },
    async abandon(id) { calls.push(`abandon ${id}`); },
    async shutdown() { calls.push('shutdown'); },
    async status() { return { kind: 'serve', pid: process.pid, guestAgent: null, pointOpen: false }; },
  };
  return { calls, handler };
}

test('control requests need the desktop\'s key: a wrong key is refused before anything runs; a captured request does not replay on another connection', async () => {
  const secret = randomBytes(32);
  const { calls, handler } = fakeHolder();
  const path = join(dir, 'a.sock');
  const server = await serveControl(path, handler, keyOf(secret), () => undefined);
  try {
    const good = await ControlClient.connect(path, keyOf(secret));
    assert.equal((await good.status()).kind, 'serve');
    // A background replica's fold says so (the holder then folds at its speed limit: background-fold.test.ts).
    await good.fold('0123456789abcdef', new Map(), { background: true });
    await good.fold('0123456789abcdef', new Map());
    assert.deepEqual(calls.splice(0), ['fold 0123456789abcdef background', 'fold 0123456789abcdef']);
    good.close();

    const stranger = await ControlClient.connect(path, keyOf(randomBytes(32)));
    await assert.rejects(stranger.freeze(), (e: unknown) => e instanceof CarryonError && e.code === 'forbidden');
    stranger.close();
    assert.deepEqual(calls, [], 'nothing ran for the stranger');

    // A request signed for one connection's challenge, sent on another: refused.
    const replay = await new Promise<string>((resolve) => {
      const s = connect(path);
      let buf = '';
      s.setEncoding('utf8').on('data', (d: string) => {
        buf += d;
        const lines = buf.split('\n');
        if (lines.length === 2 && lines[0]) {
          const req = JSON.stringify({ op: 'freeze' });
          const forged = { req, mac: keyOf(secret).sign(`${'0'.repeat(32)}:0:${req}`) };
          s.write(`${JSON.stringify(forged)}\n`);
        }
        if (lines.length >= 3) {
          s.destroy();
          resolve(lines[1]!);
        }
      });
    });
    assert.match(replay, /"error":"forbidden"/);
    assert.deepEqual(calls, []);
  } finally {
    await server.close();
  }
});

test('bad control input gets a clear answer; a sender that goes away with a point open has it abandoned', async () => {
  const secret = randomBytes(32);
  const { calls, handler } = fakeHolder();
  const path = join(dir, 'b.sock');
  const server = await serveControl(path, handler, keyOf(secret), () => undefined);
  try {
    const answer = await new Promise<string>((resolve) => {
      const s = connect(path);
      let buf = '';
      s.setEncoding('utf8').on('data', (d: string) => {
        buf += d;
        const lines = buf.split('\n');
        if (lines.length === 2) s.write('{"not json\n');
        if (lines.length >= 3) {
          s.destroy();
          resolve(lines[1]!);
        }
      });
    });
    assert.match(answer, /"error":"invalid"/);
    const sender = await ControlClient.connect(path, keyOf(secret));
    const point = await sender.freeze();
    sender.close();
    for (let i = 0; i < 50 && !calls.includes(`abandon ${point.id}`); i++) await new Promise((r) => setTimeout(r, 20));
    assert.deepEqual(calls, ['freeze', `abandon ${point.id}`]);
  } finally {
    await server.close();
  }
});

/** A holder with one point at a time, as LiveChain: a second freeze while one is open is refused. */
function onePointHolder() {
  const calls: string[] = [];
  let open: string | null = null;
  let n = 0;
  const handler: ControlHandler = {
    async freeze(opts) {
      if (open) throw new CarryonError('replica-busy', 'a replica of this desktop is already being taken');
      open = `${String(++n).padStart(2, '0')}23456789abcdef`;
      calls.push(`freeze${opts?.background ? ' background' : ''}`);
      return { id: open, kind: 'crash-consistent', pausedMs: 1, socketPath: '/x.sock', disks: [] };
    },
    async fold(id) { calls.push(`fold ${id}`); open = null; },
    async abandon(id) { calls.push(`abandon ${id}`); open = null; },
    async shutdown() { calls.push('shutdown'); },
    async status() { return { kind: 'serve', pid: process.pid, guestAgent: null, pointOpen: open !== null }; },
  };
  return { calls, handler };
}

test('a user\'s freeze asks a background replica in flight to give way and is taken once its point is back; one that does not give way, or a user\'s point, is refused', async () => {
  const secret = randomBytes(32);
  const { calls, handler } = onePointHolder();
  const path = join(dir, 'c.sock');
  const server = await serveControl(path, handler, keyOf(secret), () => undefined, { giveWayWaitMs: 1500 });
  try {
    // The agent's replica: asked to give way, it puts its point back (what liveReplicate does).
    const agent = await ControlClient.connect(path, keyOf(secret));
    const bg = await agent.freeze({ background: true });
    const asked: string[] = [];
    agent.onGiveWay((id) => {
      asked.push(id);
      void agent.abandon(id);
    });
    const user = await ControlClient.connect(path, keyOf(secret));
    const point = await user.freeze();
    assert.deepEqual(asked, [bg.id], 'the background sender was asked once');
    assert.deepEqual(calls.splice(0), ['freeze background', `abandon ${bg.id}`, 'freeze']);

    // A user's point is not the agent's to take: a second user's freeze is refused at once.
    const other = await ControlClient.connect(path, keyOf(secret));
    const t0 = Date.now();
    await assert.rejects(other.freeze(), (e: unknown) => e instanceof CarryonError && e.code === 'replica-busy' && /already being taken/.test(e.message));
    assert.ok(Date.now() - t0 < 1000, 'no wait for a user\'s point');
    await user.fold(point.id, new Map());
    calls.splice(0);

    // A background sender that does not answer: the user's freeze is refused after the wait, with what to do.
    const deaf = await ControlClient.connect(path, keyOf(secret));
    await deaf.freeze({ background: true });
    await assert.rejects(other.freeze(), (e: unknown) => e instanceof CarryonError && e.code === 'replica-busy' && /did not give way within 2 s: run the same command again/.test(e.message));
    for (const c of [agent, user, other, deaf]) c.close();
  } finally {
    await server.close();
  }
});
