import { z } from 'zod';
import { isChunkId, type ChunkId } from '../core/chunk-id.js';
import { RECEIPT_RE } from '../core/tokens/push-receipt.js';
import { batchSizeFor, inBatches, progressTracker, TransferFailed, TransferSession, type TransferOptions, type TransferResult } from './client.js';
import { endFrame } from '../core/chunks/frames.js';

/** Where a pages push takes its frames from (the laptop's chain). */
export interface PagesSource {
  /**
   * The pages frame of changed chunk `tag`, as parts to send one after the other: its written
   * pages against its checkpoint chunk, or with `whole`, every byte of it against none (the
   * server lacked the base). Or, when a server named the same pages before (an earlier attempt),
   * that name and its push receipt: nothing to send.
   */
  frame(tag: number, whole: boolean): Promise<{ parts: Buffer[] } | { known: ChunkId | null; receipt?: string }>;
  /** The names a server gave, with their receipts (kept for a later attempt). */
  remember?(names: readonly PushedName[]): Promise<void>;
}

/** A server's name for a pushed tag (null: zeros) and the receipt the commit carries for it. */
export interface PushedName {
  tag: number;
  id: ChunkId | null;
  receipt?: string;
}

export interface PushPagesOptions extends Pick<TransferOptions, 'endpoint' | 'streams' | 'batchSize' | 'signal' | 'onProgress' | 'renew' | 'rateLimit'> {
  /** Changed chunks, tagged 0 … count − 1. */
  count: number;
  source: PagesSource;
  /**
   * The server's name for each tag pushed so far (null: the chunk reads as zeros). Kept by the
   * caller across attempts: a push tried again sends only the chunks not yet named.
   */
  named: Map<number, ChunkId | null>;
  /** The push receipt of each chunk named (kept with `named`): the commit must carry them. */
  receipts: Map<ChunkId, string>;
  /**
   * The least a frame counts against `rateLimit`, in bytes. The server reads, rebuilds and
   * rewrites a whole chunk for every frame, however few pages it carries: a background replica's
   * pace is that work's, not only the wire's (send-changes.ts).
   */
  frameCharge?: number;
}

/** The server's answer to a push: validated, since the names become the laptop's manifest. */
const PushAnswer = z.object({
  named: z.array(z.object({ tag: z.number().int().min(0), id: z.string().refine(isChunkId, 'not a chunk ID').nullable(), receipt: z.string().regex(RECEIPT_RE, 'not a push receipt').optional() })).default([]),
  rejected: z.array(z.object({ tag: z.number().int().min(0).optional(), id: z.string().optional(), reason: z.string(), code: z.string().optional() })),
});

/** Frames one pages frame reads ahead of the one being sent, per stream (reads overlap the link). */
const READ_AHEAD = 2;

/**
 * Pushes changed chunks as their written pages; the transfer server rebuilds each on its copy of
 * the checkpoint, names it and answers the names by tag. A chunk whose base the server lacks is
 * sent again whole. Ends when every tag is named; throws on anything the server refused.
 */
export async function pushPages(opts: PushPagesOptions, shared?: TransferSession): Promise<TransferResult> {
  const session = shared ?? new TransferSession(opts.endpoint, opts.renew);
  const result: TransferResult = { chunksMoved: 0, bytesMoved: 0, refetched: 0 };
  try {
    let queue = Array.from({ length: opts.count }, (_, tag) => tag).filter((tag) => !opts.named.has(tag));
    const tracker = progressTracker(queue.length, opts.onProgress);
    // Round 0: pages against their bases; round 1: the chunks whose base the server lacked, whole
    // (against none, so never refused for a base: any refusal there is fatal, and the loop ends).
    for (let round = 0; queue.length; round++) {
      const whole = round > 0;
      const again: number[] = [];
      const streams = opts.streams ?? session.endpoint.maxStreams;
      await inBatches(queue, batchSizeFor(queue.length, streams, opts.batchSize), streams, async (batch) => {
        let sent = 0;
        let known = 0;
        async function* frames(): AsyncGenerator<Buffer> {
          sent = 0;
          known = 0;
          const ahead = batch.map(() => null as ReturnType<PagesSource['frame']> | null);
          const start = (i: number) => {
            if (i < batch.length && !ahead[i]) ahead[i] = opts.source.frame(batch[i]!, whole);
            ahead[i]?.catch(() => undefined);
          };
          for (let i = 0; i < batch.length; i++) {
            for (let k = i; k <= i + READ_AHEAD; k++) start(k);
            const got = await ahead[i]!;
            ahead[i] = null;
            if ('known' in got) {
              opts.named.set(batch[i]!, got.known);
              if (got.known && got.receipt) opts.receipts.set(got.known, got.receipt);
              known++;
              continue;
            }
            const parts = got.parts;
            const size = parts.reduce((s, p) => s + p.length, 0);
            await opts.rateLimit?.take(Math.max(size, opts.frameCharge ?? 0), opts.signal);
            sent += size;
            yield* parts;
          }
          const end = endFrame();
          sent += end.length;
          yield end;
        }
        const res = await session.call('/v1/chunks/push', frames, opts.signal);
        const parsed = PushAnswer.safeParse(await res.body.json());
        if (!parsed.success) throw new TransferFailed(`the transfer server's answer to a push is malformed: ${parsed.error.issues[0]?.message}`);
        const ans = parsed.data;
        const fatal = ans.rejected.filter((r) => whole || r.code !== 'base-missing' || r.tag === undefined);
        if (fatal.length) throw new TransferFailed(`the transfer server refused ${fatal.length} changed chunks: ${fatal[0]!.reason}`);
        const inBatch = new Set(batch);
        const given = ans.named.filter((n) => inBatch.has(n.tag));
        const unreceipted = given.find((n) => n.id && !n.receipt);
        if (unreceipted) throw new TransferFailed(`the transfer server named chunk ${unreceipted.id} without a push receipt (is it older than the broker?)`);
        for (const n of given) {
          opts.named.set(n.tag, n.id);
          if (n.id) opts.receipts.set(n.id, n.receipt!);
        }
        await opts.source.remember?.(given);
        const resend = ans.rejected.map((r) => r.tag!);
        again.push(...resend);
        const unanswered = batch.filter((tag) => !opts.named.has(tag) && !resend.includes(tag));
        if (unanswered.length) throw new TransferFailed(`the transfer server did not name ${unanswered.length} of the chunks it was sent`);
        const moved = batch.length - ans.rejected.length - known;
        result.chunksMoved += moved;
        result.bytesMoved += sent;
        tracker.add(sent, moved);
      });
      queue = again;
    }
    return result;
  } finally {
    if (!shared) await session.close();
  }
}
