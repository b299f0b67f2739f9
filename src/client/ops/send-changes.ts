import { join } from 'node:path';
import { z } from 'zod';
import type { ChunkId } from '../../core/chunk-id.js';
import type { LineageKeys } from '../../core/keys.js';
import { pushPages, type PagesSource } from '../../transfer-client/push-pages.js';
import { boundedLimiter } from '../../transfer-client/rate-limit.js';
import { askWithNewerFields, BrokerError, JobView, type BrokerClient } from '../../net/broker-client.js';
import { namedOutcome, pagesSource, touchedChunks, type ChangedChunk, type DiskReader } from '../../live/disks/changes.js';
import { commitUpload } from './commit.js';
import { ENDED_CODES, finishEnded } from './ended-checkout.js';
import { PushJournal } from '../../live/disks/push-journal.js';
import { retryTransfer } from '../session/retry.js';
import { activeJob, findEntry, renewer, type ClientEnv } from '../session/session.js';
import { backgroundBound, backgroundFrameCharge, policyBound } from '../session/transfer-rate.js';
import type { DesktopState, Vault } from '../vault/vault.js';
import { traceSpan, traced } from '../../files/trace.js';

/**
 * Begins an upload: a background replica says so (the broker queues it last, the transfer server
 * rebuilds it in the idle class); a broker from before background jobs refuses that field, and the
 * replica then begins as a user's would rather than not at all.
 */
export function beginAsked<T>(ask: (body: object) => Promise<T>, background: boolean): Promise<T> {
  return askWithNewerFields(ask, {}, background ? { background: true } : null);
}

/** Check-in, replicate, or hand-back (the work of a check-out that ended elsewhere, as a restore point). */
export type UploadKind = 'checkin' | 'replicate' | 'handback';

/**
 * Pushes the touched chunks' pages (those a server named in an earlier, interrupted attempt are
 * not sent again), then commits the names; chunks the commit finds collected meanwhile (pushed a
 * day earlier on a slow link) are sent again, once.
 */
async function pushAndCommit(o: { env: ClientEnv; broker: BrokerClient; state: DesktopState; kind: UploadKind; keys: LineageKeys; readers: DiskReader[]; touched: ChangedChunk[]; checkpoint: string | null; job: JobView; journalPath: string; bound: number | undefined; frameCharge?: number }) {
  const { env, broker, state, kind, keys, readers, touched, checkpoint, job } = o;
  let endpoint = job.transfer!;
  const named = new Map<number, ChunkId | null>();
  const receipts = new Map<ChunkId, string>();
  // The user's --limit-rate, never above the policy's bound (a background replica's: its own rate too, transfer-rate.ts).
  const rateLimit = boundedLimiter(env.rateLimit, o.bound);
  const push = (source: PagesSource) => retryTransfer({ what: kind, log: env.log, signal: env.signal, beforeRetry: async () => { endpoint = await renewer(broker, job.id)(); } }, () => pushPages({ endpoint, count: touched.length, source, named, receipts, signal: env.signal, rateLimit, frameCharge: o.frameCharge, renew: renewer(broker, job.id), onProgress: (p) => env.onProgress?.(kind, p) }));
  const journal = await traced('journal-open', () => PushJournal.open(o.journalPath));
  try {
    const sent = await traced('push', () => push(pagesSource(touched, keys, journal)));
    const namedAt = performance.now();
    let changes = namedOutcome(readers, touched, named);
    traceSpan('named-outcome', namedAt);
    let commit;
    try {
      commit = await traced('commit', () => commitUpload(broker, state, kind, checkpoint, changes.changes, receipts));
    } catch (err) {
      const missing = err instanceof BrokerError && err.code === 'missing-chunks' && Array.isArray(err.body.missing) ? new Set(err.body.missing as unknown[]) : null;
      if (!missing) throw err;
      env.log(`${kind}: the server no longer has ${missing.size} of the chunks sent; sending them again`);
      for (const [tag, id] of named) if (id && missing.has(id)) named.delete(tag);
      // Without the journal: it still names those chunks.
      const again = await push(pagesSource(touched, keys));
      sent.chunksMoved += again.chunksMoved;
      sent.bytesMoved += again.bytesMoved;
      changes = namedOutcome(readers, touched, named);
      commit = await commitUpload(broker, state, kind, checkpoint, changes.changes, receipts);
    }
    await traced('journal-remove', () => journal.remove());
    return { changes, sent, commit };
  } finally {
    await journal.close();
  }
}

/**
 * Sends what `readers` hold since their bases and commits it: begin the upload job, push the
 * pages, commit. A check-out that ended meanwhile is recognised (ended-checkout.ts).
 */
export async function sendChanges(o: {
  env: ClientEnv; broker: BrokerClient; vault: Vault; state: DesktopState; keys: LineageKeys; kind: UploadKind; readers: DiskReader[];
  saveCheckingIn?: (jobId: string) => Promise<void>;
  /** The agent's replica: the broker queues it after users' jobs and the transfer server rebuilds it in the idle CPU class. */
  background?: boolean;
  /** The desktop's entry, asked for by the caller while it did other work (else asked now). */
  entry?: ReturnType<typeof findEntry>;
}) {
  const { env, broker, vault, state, keys, kind, readers } = o;
  const touchedAt = performance.now();
  const touched = touchedChunks(readers);
  traceSpan('touched-chunks', touchedAt);
  // The version this upload is based on: how a commit whose answer was lost is recognised.
  const entry = await traced('find-entry', () => o.entry ?? findEntry(broker, state.desktopId));
  const checkpoint = entry.checkout?.snapshotId ?? null;
  // A background replica goes at the policy's background rate as the broker says it now (else as the check-out recorded it).
  const background = kind === 'replicate' && o.background === true;
  const bound = background ? backgroundBound(state, entry.policy.replicationRateKBps?.value) : policyBound(state);
  const frameCharge = background ? backgroundFrameCharge(readers.map((r) => r.disk.base.chunkSize)) : undefined;
  const journalPath = join(vault.desktopDir(state.desktopId), 'pushed-receipts.journal');
  let begin;
  try {
    // Repeatable: a second begin (also accepted in checking_in) ends the first one's job and opens another.
    const ask = (body: object) => broker.call('POST', `/v1/checkouts/${state.checkoutId}/${kind}`, body, z.object({ job: JobView }), {}, { repeatable: true });
    begin = await traced('begin', () => beginAsked(ask, background));
  } catch (err) {
    // The check-out ended: with this upload (its answer lost), or otherwise (offline work is
    // then never deleted on an ambiguous answer: the user is told how to hand it back).
    if (!(err instanceof BrokerError) || !ENDED_CODES.includes(err.code)) throw err;
    const ended = await finishEnded({ broker, state, kind, keys, readers, touched, journalPath, refusal: err });
    return { changes: ended.changes, sent: { chunksMoved: 0, bytesMoved: 0, refetched: 0 }, commit: { snapshotId: ended.snapshotId }, recovered: true };
  }
  await traced('save-checking-in', async () => o.saveCheckingIn?.(begin.job.id));
  const job = await traced('active-job', () => activeJob(env, broker, begin.job));
  return { ...(await pushAndCommit({ env, broker, state, kind, keys, readers, touched, checkpoint, job, journalPath, bound, frameCharge })), recovered: false };
}

