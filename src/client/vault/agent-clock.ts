import type { KeyObject } from 'node:crypto';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { z } from 'zod';
import { CarryonError } from '../../core/errors.js';
import { signBytes, verifyBytes } from '../../core/signing.js';
import { writeFileAtomic } from '../../files/atomic.js';
import { laptopClock } from './laptop-clock.js';

/**
 * The device's clock record: the latest time this laptop is known to have reached, written by the
 * agent every round without the password and signed with the device key (whose public half every
 * vault wrap pins). A vault open takes it as a floor under trusted time, so time that passed while
 * every vault was closed is not undone by setting the system clock back.
 *
 * Who may write what:
 * - the agent only moves it forward from a record that verifies, or from its own last write plus
 *   the monotonic time since (so a deleted record, or a system clock set back while it runs, costs
 *   nothing);
 * - a missing or altered record is (re)started only from broker time: a check-out, an online login
 *   (both reset it to that time, the way back from a clock that ran ahead), or an online agent
 *   round that received a fresh lease. Never from the system clock alone: deleting the file and
 *   restarting the agent with the clock set back would otherwise start it over at the earlier time.
 */
export const AGENT_CLOCK = 'agent-clock.json';

const Payload = z.object({ purpose: z.literal('carryon-agent-clock'), deviceId: z.string(), time: z.iso.datetime() });
const Signed = z.object({ payload: z.string(), signature: z.string() });

export type AgentClockRead = { kind: 'ok'; time: number } | { kind: 'missing' } | { kind: 'altered'; why: string };

/** The record checked against the device key pinned in a vault wrap (or the agent's own key). */
export async function readAgentClock(home: string, devicePub: KeyObject, deviceId: string): Promise<AgentClockRead> {
  let text: string;
  try {
    text = await readFile(join(home, AGENT_CLOCK), 'utf8');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return { kind: 'missing' };
    // Unreadable (a directory in its place, no permission) counts as altered: refused, never skipped.
    return { kind: 'altered', why: `cannot be read (${(err as NodeJS.ErrnoException).code ?? (err as Error).message})` };
  }
  let signed: z.infer<typeof Signed>;
  try {
    signed = Signed.parse(JSON.parse(text));
  } catch {
    return { kind: 'altered', why: 'is damaged' };
  }
  const bytes = Buffer.from(signed.payload, 'base64');
  if (!verifyBytes(devicePub, bytes, signed.signature)) return { kind: 'altered', why: 'is not signed by this device\'s key' };
  let payload: z.infer<typeof Payload>;
  try {
    payload = Payload.parse(JSON.parse(bytes.toString('utf8')));
  } catch {
    return { kind: 'altered', why: 'is damaged' };
  }
  if (payload.deviceId !== deviceId) return { kind: 'altered', why: 'names another device' };
  return { kind: 'ok', time: Date.parse(payload.time) };
}

async function writeAgentClock(home: string, deviceKey: KeyObject, deviceId: string, time: number): Promise<void> {
  const payload = Buffer.from(JSON.stringify(Payload.parse({ purpose: 'carryon-agent-clock', deviceId, time: new Date(time).toISOString() })));
  await writeFileAtomic(join(home, AGENT_CLOCK), JSON.stringify({ payload: payload.toString('base64'), signature: signBytes(deviceKey, payload) }));
}

/** Online (check-out, login): broker time is the truth, so the record is set to it (the system clock's, if later). */
export async function resetAgentClock(home: string, deviceKey: KeyObject, deviceId: string, brokerTime: string): Promise<number> {
  const time = Math.max(laptopClock.now(), Date.parse(brokerTime));
  await writeAgentClock(home, deviceKey, deviceId, time);
  return time;
}

/**
 * The floor the device's record puts under one desktop's trusted time at a vault open.
 * `seenBefore`: this desktop's MACed clock record has taken an agent record as a floor (every
 * check-out and online login since agent records exist set one), so a missing record was removed.
 * Refusing is the safe answer to a removed or altered record: ignoring it would make deleting or
 * editing the file a way to take back the time the agent recorded. A record never seen is ignored
 * (a vault checked out before agent records: today's bound, the desktop's own record).
 */
export async function agentClockFloor(home: string, devicePub: KeyObject, deviceId: string, seenBefore: boolean, name: string): Promise<number | null> {
  const found = await readAgentClock(home, devicePub, deviceId);
  if (found.kind === 'ok') return found.time;
  if (found.kind === 'missing' && !seenBefore) return null;
  const what = found.kind === 'missing' ? 'is missing' : found.why;
  throw new CarryonError('clock-untrusted', `this device's clock record (${AGENT_CLOCK}, kept by \`carryon agent\`) ${what}, so ${name} cannot tell how much time has passed: connect to the broker and run \`carryon login\` to re-establish trusted time`);
}

/**
 * The agent's writer: one per agent process, carrying its last write forward by the monotonic
 * clock, so neither setting the system clock back nor deleting the file while it runs gains time.
 */
export class AgentClockWriter {
  private last: { time: number; mono: number } | null = null;
  private warned = false;

  constructor(private readonly home: string, private readonly device: { key: KeyObject; pub: KeyObject; id: string }, private readonly log: (line: string) => void) {}

  /** Each round: the record moved forward; null when there is nothing to move it from (missing or altered, and no write of this process yet). */
  async advance(): Promise<number | null> {
    const found = await readAgentClock(this.home, this.device.pub, this.device.id);
    const carried = this.carried();
    if (found.kind !== 'ok' && carried === null) {
      // Missing is also a device that has checked nothing out yet: only an altered record is news.
      if (found.kind === 'altered' && !this.warned) this.log(`the device clock record (${AGENT_CLOCK}) ${found.why}: offline opens refuse until the next contact with the broker (or \`carryon login\`) starts it again`);
      this.warned = true;
      return null;
    }
    return this.write(Math.max(laptopClock.now(), carried ?? 0, found.kind === 'ok' ? found.time : 0));
  }

  /** An online round with a fresh broker-signed lease: its time may (re)start the record. */
  async anchor(brokerTime: string): Promise<number> {
    const found = await readAgentClock(this.home, this.device.pub, this.device.id);
    return this.write(Math.max(laptopClock.now(), Date.parse(brokerTime), this.carried() ?? 0, found.kind === 'ok' ? found.time : 0));
  }

  private carried(): number | null {
    return this.last ? this.last.time + Math.max(0, laptopClock.monotonic() - this.last.mono) : null;
  }

  private async write(time: number): Promise<number> {
    // A failed write (a full disk) keeps the time for this process's decisions: it stays a lower bound.
    this.last = { time, mono: laptopClock.monotonic() };
    try {
      await writeAgentClock(this.home, this.device.key, this.device.id, time);
    } catch (err) {
      this.log(`could not write the device clock record: ${(err as Error).message}`);
    }
    return time;
  }
}
