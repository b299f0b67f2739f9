import assert from 'node:assert/strict';
import { mkdtemp, rm } from 'node:fs/promises';
import { createServer, type Server, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { GuestAgent, GuestAgentError, GuestAgentUnavailable, QGA_SENTINEL } from '../../src/live/guest-agent.js';

// A fake qemu-guest-agent on a unix socket: it reads QGA's line protocol (a leading 0xFF resets
// its parser, as the real one's does) and answers through `respond`, which a test replaces.
type Respond = (req: { execute: string; arguments?: Record<string, unknown> }, sock: Socket) => void;
let dir: string;
let n = 0;
const servers: Server[] = [];
const peers: Socket[] = [];

/** The real agent's answers: the sync after a sentinel, freeze/thaw/status/ping as QGA shapes them. */
const agentLike: Respond = (req, sock) => {
  const reply = (v: unknown) => sock.write(`${JSON.stringify({ return: v })}\n`);
  if (req.execute === 'guest-sync-delimited') sock.write(Buffer.concat([Buffer.from([QGA_SENTINEL]), Buffer.from(`${JSON.stringify({ return: req.arguments?.id })}\n`)]));
  else if (req.execute === 'guest-ping') reply({});
  else if (req.execute === 'guest-fsfreeze-freeze') reply(2);
  else if (req.execute === 'guest-fsfreeze-thaw') reply(2);
  else if (req.execute === 'guest-fsfreeze-status') reply('frozen');
  else if (req.execute === 'guest-shutdown') return; // success: no answer at all
  else sock.write(`${JSON.stringify({ error: { class: 'CommandNotFound', desc: `no ${req.execute}` } })}\n`);
};

async function fakeAgent(respond: Respond): Promise<string> {
  const path = join(dir, `qga-${++n}.sock`);
  const server = createServer((sock) => {
    let buf = '';
    peers.push(sock);
    sock.on('error', () => undefined);
    sock.on('data', (d: Buffer) => {
      buf += d.toString('latin1').replace(/\xff/g, '');
      let nl;
      while ((nl = buf.indexOf('\n')) >= 0) {
        const line = buf.slice(0, nl);
        buf = buf.slice(nl + 1);
        if (line.trim()) respond(JSON.parse(line) as { execute: string }, sock);
      }
    });
  });
  servers.push(server);
  await new Promise<void>((r) => server.listen(path, r));
  return path;
}

before(async () => {
  dir = await mkdtemp(join(tmpdir(), 'carryon-qga-'));
});
after(async () => {
  for (const p of peers) p.destroy();
  for (const s of servers) s.close();
  await rm(dir, { recursive: true, force: true });
});

test('sync, ping, freeze, status, thaw against an agent-like peer', async () => {
  const agent = await GuestAgent.connect(await fakeAgent(agentLike), 2_000);
  try {
    await agent.ping(1_000);
    assert.equal(await agent.freeze(1_000), 2);
    assert.equal(await agent.status(1_000), 'frozen');
    assert.equal(await agent.thaw(1_000), 2);
  } finally {
    agent.close();
  }
});

test('bytes before the sentinel (a stale answer, half a line, binary noise) are discarded', async () => {
  const path = await fakeAgent((req, sock) => {
    if (req.execute === 'guest-sync-delimited') sock.write(Buffer.concat([Buffer.from('{"return": 7}\n{"retu\x01\x02'), Buffer.from([QGA_SENTINEL]), Buffer.from(`{"return": ${String(req.arguments?.id)}}\n`)]));
    else agentLike(req, sock);
  });
  const agent = await GuestAgent.connect(path, 2_000);
  assert.equal(await agent.freeze(1_000), 2);
  agent.close();
});

/** Like the real agent, answers leave in the order asked: `delayMs` of one answer delays all later ones. */
function inOrder(delayMs: (req: { execute: string }) => number, respond: Respond = agentLike): Respond {
  // A queue, as a real agent is: two timers due in the same millisecond (a loaded box) may fire in either order.
  let tail = Promise.resolve();
  return (req, sock) => {
    tail = tail.then(() => new Promise<void>((r) => setTimeout(r, delayMs(req)))).then(() => void respond(req, sock));
  };
}

test('an earlier sync answer (wrong id after its sentinel) is skipped until ours comes', async () => {
  const ordered = inOrder((req) => (req.execute === 'guest-sync-delimited' ? 50 : 0));
  const path = await fakeAgent((req, sock) => {
    // at once: the answer to a sync some earlier client sent; ours follows 50 ms later
    if (req.execute === 'guest-sync-delimited') sock.write(Buffer.concat([Buffer.from([QGA_SENTINEL]), Buffer.from('{"return": 12345}\n')]));
    ordered(req, sock);
  });
  const agent = await GuestAgent.connect(path, 2_000);
  assert.equal(await agent.status(1_000), 'frozen');
  agent.close();
});

test('a socket where nothing answers (a guest without an agent) costs the timeout, no more', async () => {
  const path = await fakeAgent(() => undefined);
  const t0 = Date.now();
  await assert.rejects(GuestAgent.connect(path, 300), (e: unknown) => e instanceof GuestAgentUnavailable && /did not answer guest-sync-delimited within \d+ ms: the guest runs no agent, or it is stuck, or another client holds/.test(e.message));
  const ms = Date.now() - t0;
  assert.ok(ms >= 290 && ms < 1_500, `bounded by the timeout: ${ms} ms`);
});

test('no socket at all: unavailable at once', async () => {
  await assert.rejects(GuestAgent.connect(join(dir, 'absent.sock'), 2_000), GuestAgentUnavailable);
  const none = await GuestAgent.tryConnect(join(dir, 'absent.sock'), 2_000);
  assert.equal(none.agent, null);
  assert.match(none.reason!, /no guest agent channel at .*absent\.sock/);
  const some = await GuestAgent.tryConnect(await fakeAgent(agentLike), 2_000);
  assert.ok(some.agent && some.reason === undefined);
  some.agent.close();
});

test('a command answered too late: it times out, and its late answer never reaches the next command', async () => {
  let slow = true;
  const path = await fakeAgent(
    inOrder(
      (req) => (req.execute === 'guest-fsfreeze-freeze' && slow ? ((slow = false), 200) : 0),
      (req, sock) => (req.execute === 'guest-fsfreeze-freeze' ? sock.write('{"return": 3}\n') : agentLike(req, sock)),
    ),
  );
  const agent = await GuestAgent.connect(path, 2_000);
  const t0 = Date.now();
  await assert.rejects(agent.freeze(100), (e: unknown) => e instanceof GuestAgentUnavailable && /guest-fsfreeze-freeze within 100 ms/.test(e.message));
  assert.ok(Date.now() - t0 < 1_000);
  // Asked at once: the stale {"return": 3} arrives while this waits, before its own answer.
  assert.equal(await agent.status(1_000), 'frozen', 'the next command re-synced past the stale answer');
  agent.close();
});

test('errors and malformed answers', async () => {
  const path = await fakeAgent((req, sock) => {
    if (req.execute === 'guest-fsfreeze-freeze') sock.write('{"error": {"class": "GenericError", "desc": "failed to freeze /mnt"}}\n');
    else if (req.execute === 'guest-fsfreeze-thaw') sock.write('{"return": "lots"}\n');
    else if (req.execute === 'guest-fsfreeze-status') sock.write('not json at all\n');
    else agentLike(req, sock);
  });
  const agent = await GuestAgent.connect(path, 2_000);
  await assert.rejects(agent.freeze(1_000), (e: unknown) => e instanceof GuestAgentError && e.errorClass === 'GenericError' && /failed to freeze/.test(e.message));
  await assert.rejects(agent.thaw(1_000), (e: unknown) => e instanceof GuestAgentError && /guest-fsfreeze-thaw: unexpected answer "lots"/.test(e.message));
  await assert.rejects(agent.status(1_000), (e: unknown) => e instanceof GuestAgentError && e.errorClass === 'ProtocolError');
  await agent.ping(1_000); // re-synced after the garbage
  agent.close();
});

test('shutdown: silence is success, an error is thrown, a dead agent is unavailable', async () => {
  const ok = await GuestAgent.connect(await fakeAgent(agentLike), 2_000);
  const t0 = Date.now();
  await ok.shutdown('powerdown', 1_000, 200);
  assert.ok(Date.now() - t0 < 1_000);
  ok.close();

  const refusing = await GuestAgent.connect(
    await fakeAgent((req, sock) => (req.execute === 'guest-shutdown' ? sock.write('{"error": {"class": "GenericError", "desc": "child process has failed to shutdown"}}\n') : agentLike(req, sock))),
    2_000,
  );
  await assert.rejects(refusing.shutdown('reboot', 1_000, 500), (e: unknown) => e instanceof GuestAgentError && /failed to shutdown/.test(e.message));
  refusing.close();

  // An agent that went quiet after connecting: shutdown must not report success on silence.
  let alive = true;
  const quiet = await GuestAgent.connect(await fakeAgent((req, sock) => alive && agentLike(req, sock)), 2_000);
  alive = false;
  await assert.rejects(quiet.shutdown('powerdown', 200, 200), GuestAgentUnavailable);
  quiet.close();

  const closed = await GuestAgent.connect(await fakeAgent(agentLike), 2_000);
  closed.close();
  await assert.rejects(closed.shutdown('powerdown', 200, 200), GuestAgentUnavailable);
});

test('a flood without a newline is an error, not a growing buffer', async () => {
  const path = await fakeAgent((req, sock) => (req.execute === 'guest-ping' ? sock.write(Buffer.alloc(2 << 20, 0x61)) : agentLike(req, sock)));
  const agent = await GuestAgent.connect(path, 2_000);
  await assert.rejects(agent.ping(2_000), (e: unknown) => e instanceof GuestAgentError && /longer than/.test(e.message));
  agent.close();
});
