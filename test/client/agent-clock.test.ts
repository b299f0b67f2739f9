import assert from 'node:assert/strict';
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, afterEach, test } from 'node:test';
import { AGENT_CLOCK, AgentClockWriter, agentClockFloor, readAgentClock, resetAgentClock } from '../../src/client/vault/agent-clock.js';
import { laptopClock } from '../../src/client/vault/laptop-clock.js';
import { generateSigningKey, signBytes } from '../../src/core/signing.js';

// The device clock record on its own (no broker, no vault): what the agent writes, what a vault
// open accepts. The vault side end to end is in test/e2e/agent.test.ts and tamper.test.ts.
const home = mkdtempSync(join(tmpdir(), 'carryon-agent-clock-'));
const file = join(home, AGENT_CLOCK);
const device = (() => {
  const k = generateSigningKey();
  return { key: k.privateKey, pub: k.publicKey, id: 'dev-1' };
})();
const T = Date.parse('2026-06-01T12:00:00Z');
const MIN = 60_000;
const saved = { ...laptopClock };
/** Moves the laptop's clocks: the system clock to `now`, the monotonic one to `mono`. */
const setClocks = (now: number, mono: number) => {
  laptopClock.now = () => now;
  laptopClock.monotonic = () => mono;
};
const floor = (seenBefore: boolean) => agentClockFloor(home, device.pub, device.id, seenBefore, 'win11');

afterEach(() => {
  Object.assign(laptopClock, saved);
  rmSync(file, { force: true, recursive: true });
});
after(() => rmSync(home, { recursive: true, force: true }));

test('the agent starts no record from the system clock alone; broker time starts it; each round moves it forward', async () => {
  setClocks(T, 0);
  const agent = new AgentClockWriter(home, device, () => undefined);
  assert.equal(await agent.advance(), null, 'missing and nothing to carry: the system clock alone may not start it');
  assert.equal(existsSync(file), false);
  assert.equal(await agent.anchor(new Date(T - 5 * MIN).toISOString()), T, 'broker time, or the system clock when that is later');
  setClocks(T + MIN, MIN);
  assert.equal(await agent.advance(), T + MIN);
  assert.deepEqual(await readAgentClock(home, device.pub, device.id), { kind: 'ok', time: T + MIN });
});

test('the system clock set back 10 min while the agent runs: the record still moves on by the time that passed', async () => {
  setClocks(T, 1_000);
  const agent = new AgentClockWriter(home, device, () => undefined);
  await agent.anchor(new Date(T).toISOString());
  // One interval later the system clock reads 10 min earlier; the monotonic clock says 60 s passed.
  setClocks(T - 9 * MIN, 1_000 + MIN);
  assert.equal(await agent.advance(), T + MIN);
  // The record deleted while it runs: written again from its own last write, not from the system clock.
  rmSync(file);
  setClocks(T - 8 * MIN, 1_000 + 2 * MIN);
  assert.equal(await agent.advance(), T + 2 * MIN);
  // A new agent process (a reboot) never writes a time earlier than the record it finds.
  setClocks(T - 7 * MIN, 5);
  assert.equal(await new AgentClockWriter(home, device, () => undefined).advance(), T + 2 * MIN);
});

test('a vault open: a record that verifies is a floor; altered or removed after it was seen refuses; never seen is ignored', async () => {
  assert.equal(await floor(false), null, 'a vault from before agent records: today\'s bound');
  await assert.rejects(floor(true), { code: 'clock-untrusted', message: /agent-clock\.json.* is missing.*carryon login/ });
  setClocks(T, 0);
  await resetAgentClock(home, device.key, device.id, new Date(T - MIN).toISOString());
  assert.equal(await floor(true), T);

  const good = readFileSync(file, 'utf8');
  const { payload } = JSON.parse(good) as { payload: string; signature: string };
  const body = JSON.parse(Buffer.from(payload, 'base64').toString('utf8')) as Record<string, unknown>;
  const earlier = Buffer.from(JSON.stringify({ ...body, time: new Date(T - 60 * MIN).toISOString() }));
  const forger = generateSigningKey().privateKey;
  const cases: [string, string][] = [
    ['an earlier time, signature kept', JSON.stringify({ payload: earlier.toString('base64'), signature: JSON.parse(good).signature })],
    ['an earlier time signed by another key', JSON.stringify({ payload: earlier.toString('base64'), signature: signBytes(forger, earlier) })],
    ['another device\'s record', (() => {
      const other = Buffer.from(JSON.stringify({ ...body, deviceId: 'dev-2' }));
      return JSON.stringify({ payload: other.toString('base64'), signature: signBytes(device.key, other) });
    })()],
    ['not JSON', good.slice(0, 20)],
  ];
  for (const [what, text] of cases) {
    writeFileSync(file, text);
    for (const seen of [false, true]) await assert.rejects(floor(seen), { code: 'clock-untrusted' }, what);
  }
  rmSync(file);
  mkdirSync(file);
  await assert.rejects(floor(false), { code: 'clock-untrusted', message: /cannot be read \(EISDIR\)/ }, 'a directory in its place');
  rmSync(file, { recursive: true });
});
