import type { ChunkId } from '../core/chunk-id.js';
import { pushReceipt, type ReceiptKey } from '../core/tokens/push-receipt.js';
import type { TicketPayload } from '../core/tokens/ticket.js';
import { WriteWindow } from '../core/write-window.js';
import type { ChunkStore } from '../store/chunk-store.js';
import type { DeltaKeeper } from './delta-keeper.js';
import { deltaRecordId, deltaWorthKeeping, makeDeltaRecord, ZERO_BASE } from '../core/chunks/delta-record.js';
import { FRAME_END, FRAME_PAGES, FrameDecoder, FrameError, type Frame } from '../core/chunks/frames.js';
import type { PushChecks } from './push-checks.js';
import type { JobCounters, Scope } from './scopes.js';

type PagesFrame = Extract<Frame, { type: typeof FRAME_PAGES }>;

/** Frames checked and stored in flight per upload stream. */
const PUSH_WINDOW = 16;

/** What a push answers: counts, the tags refused and why, and the ID and receipt of each pages frame. */
export interface PushResult {
  stored: number;
  duplicate: number;
  rejected: { tag: number; reason: string; code: 'invalid' | 'base-missing' }[];
  /**
   * Pages frames, by tag: the ID of the chunk each rebuilt (null: zeros) and its push receipt,
   * which the commit must carry for the broker to accept that ID (core/push-receipt).
   */
  named: { tag: number; id: ChunkId | null; receipt?: string }[];
}

/**
 * One upload stream (`POST /v1/chunks/push`) under a verified upload ticket: its frames are
 * decoded, each pages frame rebuilt on its base (a chunk of the checkout's checkpoint, or zeros),
 * named here, stored when new, and answered with a receipt. Nothing is accepted under an ID the
 * sender gives (decision 53); a frame of any other type refuses the whole stream.
 */
export class PushSession {
  private readonly decoder = new FrameDecoder();
  private readonly result: PushResult = { stored: 0, duplicate: 0, rejected: [], named: [] };
  /** Per chunk ID in this stream: its store, so a later copy of the same chunk waits for it and counts as a duplicate. */
  private readonly stored = new Map<ChunkId, Promise<void>>();
  /** Frames are checked (on worker threads where the host has cores to spare) and appended to the store while the next ones arrive. */
  private readonly window = new WriteWindow(PUSH_WINDOW);
  private framesNamed = 0;

  constructor(private readonly o: {
    store: ChunkStore; scope: Scope; ticket: TicketPayload; checks: PushChecks; receipts: ReceiptKey;
    /** Delta records written after the push answers (a held one is already fetchable here). */
    deltas: DeltaKeeper;
    /** This job's counters and the server's (bytes in, chunks rejected). */
    counters: JobCounters; stats: { bytesIn: number; blobsRejected: number };
  }) {}

  /** Reads the body to its end; whatever happens, no check or put is left running when it returns or throws. */
  async run(body: AsyncIterable<Buffer>): Promise<PushResult> {
    try {
      for await (const piece of body) {
        this.o.stats.bytesIn += piece.length;
        this.o.counters.bytesIn += piece.length;
        for (const frame of this.decoder.push(piece)) {
          // Only pages travel up: a chunk under an ID the sender gives (the named blob and delta
          // frames of old) is refused with the whole stream.
          if (frame.type === FRAME_END) continue;
          if (frame.type !== FRAME_PAGES) throw new FrameError(`a push carries pages frames only, not type ${frame.type}`);
          await this.window.add(this.name(frame));
        }
      }
      this.decoder.finish();
      await this.window.drain();
      await this.o.store.sync();
      return this.result;
    } finally {
      await this.window.drain().catch(() => undefined);
      this.o.deltas.flushSoon();
    }
  }

  private rejectTag(tag: number, reason: string, code: 'invalid' | 'base-missing' = 'invalid'): void {
    this.o.stats.blobsRejected++;
    this.result.rejected.push({ tag, reason, code });
  }

  /** Stores a chunk named here once per stream (a later copy waits for the first and is a duplicate). */
  private store(id: ChunkId, blob: Buffer): Promise<void> {
    const { scope, store } = this.o;
    const earlier = this.stored.get(id);
    const task = earlier
      ? earlier.then(() => void this.result.duplicate++)
      : (async () => {
          const known = scope.base.has(id) || scope.pushed.has(id);
          const fresh = await store.put(id, blob, { defer: true });
          // A duplicate of a chunk outside the checkout's own would tell that another desktop has it.
          if (fresh || !known) this.result.stored++;
          else this.result.duplicate++;
          scope.pushed.add(id);
        })();
    this.stored.set(id, task);
    return task;
  }

  /** A delta record the keeper cannot hold: stored with this push's chunks. A cache: one that cannot be stored costs a later check-out bytes, never this push. */
  private async keepRecord(id: ChunkId, record: Buffer): Promise<void> {
    await this.o.store.put(deltaRecordId(id), record, { defer: true }).catch(() => undefined);
  }

  /** A pages frame: rebuilt on its base (a checkpoint chunk, or zeros), named here, stored when new. */
  private async name(frame: PagesFrame): Promise<void> {
    const { scope, ticket } = this.o;
    let named;
    let base: { id: ChunkId; blob: Buffer } | null = null;
    try {
      if (frame.baseId) {
        // Only a chunk of the checkout's checkpoint may serve as a base (else: an existence oracle).
        const blob = scope.base.has(frame.baseId) ? await this.o.store.get(frame.baseId) : null;
        if (!blob) return this.rejectTag(frame.tag, `base chunk ${frame.baseId} is not here: send the whole chunk`, 'base-missing');
        base = { id: frame.baseId, blob };
      }
      // A stream's first frame is named here, the rest on the threads: a check-in of one chunk (the
      // common one) waited ≈ 10 ms more for a thread that had never run the code, and the copies to it.
      named = await this.o.checks.name(scope.keys, frame.payload, base, `#${frame.tag} (pushed pages)`, { background: ticket.background === true, inline: this.framesNamed++ === 0 });
    } catch (err) {
      return this.rejectTag(frame.tag, (err as Error).message);
    }
    this.o.counters.chunksIn++;
    if (named.id && named.blob) {
      // How Y was made from its base: a laptop still holding the base later fetches these pages instead of Y (delta-record.ts).
      const baseId = base?.id ?? ZERO_BASE;
      const keep = named.id !== base?.id && deltaWorthKeeping(frame.payload.length, named.blob.length);
      const record = keep && !this.o.deltas.hold(scope.keys, baseId, named.id, frame.payload) ? makeDeltaRecord(scope.keys, baseId, named.id, frame.payload) : null;
      await Promise.all([this.store(named.id, named.blob), record && this.keepRecord(named.id, record)]);
    }
    this.result.named.push(named.id
      ? { tag: frame.tag, id: named.id, receipt: pushReceipt(this.o.receipts, { checkoutId: ticket.checkoutId, keyContext: ticket.keyContext, id: named.id }) }
      : { tag: frame.tag, id: null });
  }
}
