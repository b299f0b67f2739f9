import type { FreezeAgent } from './guest-agent.js';

/**
 * Freezing the guest's file systems around a point in time (the snapshot transaction), so a
 * restore point holds what the guest's file systems hold on disk, journals flushed: "quiesced".
 * Anything less (no agent, an agent that does not answer, a freeze or thaw that takes too long)
 * still takes the point in time, and the result says "crash-consistent" and why: a replica is
 * never refused for want of an agent, and a guest is never left frozen for want of a thaw.
 */

export type Consistency = 'quiesced' | 'crash-consistent';

export interface QuiesceOptions {
  /** The agent must answer a ping this fast before anything is frozen (default 2 s). */
  pingTimeoutMs?: number;
  /** A freeze that takes longer is given up on: crash-consistent (default 10 s). */
  freezeTimeoutMs?: number;
  /** Each thaw attempt's bound (default 10 s). */
  thawTimeoutMs?: number;
  /** Thaw attempts in all, one after the other (default 3). */
  thawAttempts?: number;
  /** Told about each thing that went wrong (e.g. to log it). */
  onProblem?: (message: string) => void;
}

export interface Quiesced<T> {
  /** What `pointInTime` returned. */
  result: T;
  kind: Consistency;
  /** How long the guest's writes may have been held: from the freeze request to the thaw's answer (0 if nothing froze). */
  frozenMs: number;
  /** Why it is crash-consistent. */
  reason?: string;
  /** False only when every thaw attempt failed: the guest may still be frozen (tell the user). */
  thawed: boolean;
}

const message = (e: unknown) => (e instanceof Error ? e.message : String(e));

/**
 * Freezes (bounded), runs `pointInTime`, thaws (always, also when `pointInTime` throws; then its
 * error is rethrown after the thaw). Without an agent, or one that does not answer, `pointInTime`
 * runs anyway, unfrozen.
 */
export async function quiesce<T>(agent: FreezeAgent | null, pointInTime: () => Promise<T>, opts: QuiesceOptions = {}): Promise<Quiesced<T>> {
  const problem = (m: string) => {
    opts.onProblem?.(m);
    return m;
  };
  if (!agent) return { result: await pointInTime(), kind: 'crash-consistent', frozenMs: 0, reason: 'no guest agent', thawed: true };

  // A freeze is sent only to an agent that answers now: one sent into a channel nobody reads
  // would be carried out whenever an agent starts, with nobody left to thaw it.
  let reason: string | undefined;
  let mayBeFrozen = false;
  let freezeStarted = 0;
  try {
    await agent.ping(opts.pingTimeoutMs ?? 2_000);
    freezeStarted = Date.now();
    mayBeFrozen = true;
    const count = await agent.freeze(opts.freezeTimeoutMs ?? 10_000);
    if (count < 1) {
      mayBeFrozen = false;
      reason = problem('the guest agent froze no file system');
    }
  } catch (e) {
    reason = problem(mayBeFrozen ? `the guest's file systems did not freeze: ${message(e)}` : `the guest agent does not answer: ${message(e)}`);
  }

  let outcome: { ok: true; value: T } | { ok: false; error: unknown };
  try {
    outcome = { ok: true, value: await pointInTime() };
  } catch (error) {
    outcome = { ok: false, error };
  }

  let thawed = true;
  let frozenMs = 0;
  if (mayBeFrozen) {
    thawed = false;
    const attempts = Math.max(1, opts.thawAttempts ?? 3);
    for (let i = 1; i <= attempts && !thawed; i++) {
      try {
        await agent.thaw(opts.thawTimeoutMs ?? 10_000);
        thawed = true;
        if (i > 1) reason ??= problem(`the guest thawed only at attempt ${i}`);
      } catch (e) {
        const m = problem(`thaw attempt ${i} of ${attempts} failed: ${message(e)}`);
        if (i === 1) reason ??= `the guest did not thaw in time (${m})`;
      }
    }
    frozenMs = Date.now() - freezeStarted;
    if (!thawed) reason = problem(`the guest did not thaw after ${attempts} attempts: it may still be frozen`);
  }

  if (!outcome.ok) throw outcome.error;
  return reason === undefined ? { result: outcome.value, kind: 'quiesced', frozenMs, thawed } : { result: outcome.value, kind: 'crash-consistent', frozenMs, reason, thawed };
}
