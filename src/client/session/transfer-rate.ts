import { join } from 'node:path';
import { z } from 'zod';
import { writeFileAtomic } from '../../files/atomic.js';
import { POLICY_DEFAULTS } from '../../core/policy.js';
import { boundedLimiter, effectiveRate, RateLimiter } from '../../transfer-client/rate-limit.js';
import { readJsonFile } from '../../files/json-file.js';
import type { ClientEnv } from './session.js';
import type { DesktopState, Vault } from '../vault/vault.js';

/**
 * Which rate limit a desktop's transfers run under. The user's `--limit-rate` of a check-out is
 * remembered for that desktop, so a download that `run` or `serve` (or a rerun) takes over keeps
 * it unless that command names its own; the policy's `maxTransferRateKBps` (MACed in the state at
 * check-out) caps every transfer, check-in and replicate included, whatever the user asks.
 */
const Remembered = z.object({ v: z.literal(1), limitRateBytesPerSecond: z.number().int().positive() });

function rememberedFile(vault: Vault, desktopId: string): string {
  return join(vault.desktopDir(desktopId), 'transfer-rate.json');
}

/** Keeps this command's `--limit-rate` (if any) as the desktop's own, for the commands that continue its download. */
export async function rememberRate(env: ClientEnv, vault: Vault, desktopId: string): Promise<void> {
  if (!env.rateLimit) return;
  await writeFileAtomic(rememberedFile(vault, desktopId), JSON.stringify({ v: 1, limitRateBytesPerSecond: Math.floor(env.rateLimit.bytesPerSecond) }));
}

/** The policy's bound, in bytes per second (undefined: none). */
export function policyBound(state: DesktopState): number | undefined {
  const kbps = Number(state.config.maxTransferRateKBps ?? 0);
  return Number.isFinite(kbps) && kbps > 0 ? kbps * 1024 : undefined;
}

/**
 * The bound on a background (scheduled) replica, bytes per second: the policy's
 * `replicationRateKBps` as the broker says it now (`current`), else as the check-out recorded it,
 * else the default; always within `maxTransferRateKBps`. Undefined: none.
 */
export function backgroundBound(state: DesktopState, current?: unknown): number | undefined {
  const valid = (v: unknown): v is number => typeof v === 'number' && Number.isInteger(v) && v >= 0;
  const recorded = state.config.replicationRateKBps;
  const kbps = valid(current) ? current : valid(recorded) ? recorded : POLICY_DEFAULTS.replicationRateKBps;
  return effectiveRate(kbps > 0 ? kbps * 1024 : undefined, policyBound(state));
}

/**
 * The least each frame of a background replica counts against its rate: a quarter of the chunk the
 * server rebuilds for it. Any frame, a single 4 KiB page too, makes the transfer server read,
 * rebuild, seal and rewrite a whole chunk; counted by wire bytes alone, scattered small writes had
 * it rewrite 256 KiB chunks at 300 a second under the 8 MiB/s default (a desktop's own 64 KiB
 * writes are paced as before). Beside a guest writing 4 KiB at random (bench, live section, same
 * machine): 0.67–0.78× of its IOPS alone before, 0.87–0.94× with this.
 */
export function backgroundFrameCharge(chunkSizes: readonly number[]): number {
  return Math.max(0, ...chunkSizes) / 4;
}

/** The limiter for a transfer of this desktop: this command's, else the remembered one, within the policy's bound. */
export async function transferLimiter(env: ClientEnv, vault: Vault, state: DesktopState, opts: { remembered?: boolean } = {}): Promise<RateLimiter | undefined> {
  let user = env.rateLimit;
  if (!user && opts.remembered !== false) {
    // A damaged file is no remembered limit (a user preference, not a guard: the policy bound still holds).
    const kept = await readJsonFile(rememberedFile(vault, state.desktopId), Remembered, { missing: null, damaged: null });
    if (kept) user = new RateLimiter(kept.limitRateBytesPerSecond);
  }
  return boundedLimiter(user, policyBound(state));
}
