import type { ChunkId } from '../core/chunk-id.js';
import { deltaRecordId, makeDeltaRecord } from '../core/chunks/delta-record.js';
import type { LineageKeys } from '../core/keys.js';
import type { ChunkStore } from '../store/chunk-store.js';

interface Held { keys: LineageKeys; baseId: ChunkId; newId: ChunkId; pages: Uint8Array; record?: Buffer; counted: number }

/**
 * The delta records of this server's pushes (core/chunks/delta-record.ts), made and written to
 * the store once pushes have been quiet for a moment. Made and stored inside the push, they cost
 * a 4 GiB desktop's check-in after 1 % of it changed ≈ 0.2 s here (the copies, the index rows and
 * the sync of 40 MB more, on the cores the laptop's own steps then need): a record is a cache a later
 * check-out may use, so no check-in should wait for it. Until it is in the store, this server's
 * fetches find it here. Bounded: past `maxBytes` held, a push stores its records itself. Lost in
 * a crash, a record costs a later check-out bytes, never data.
 */
export class DeltaKeeper {
  private readonly held = new Map<ChunkId, Held>();
  private bytes = 0;
  private writing: Promise<void> = Promise.resolve();
  private timer: NodeJS.Timeout | null = null;

  constructor(private readonly store: ChunkStore, private readonly quietMs = 2000, private readonly maxBytes = 256 * 1024 * 1024) {}

  /** Whether the record of `newId` (made by `pages` over `baseId`) may wait here; false: the caller stores it now. */
  hold(keys: LineageKeys, baseId: ChunkId, newId: ChunkId, pages: Uint8Array): boolean {
    const id = deltaRecordId(newId);
    if (this.held.has(id)) return true;
    // `pages` is a view of what the socket read (not copied: that is the push's time): the memory it keeps alive is counted.
    const counted = Math.max(pages.length, pages.buffer.byteLength);
    if (this.bytes + counted > this.maxBytes) return false;
    this.held.set(id, { keys, baseId, newId, pages, counted });
    this.bytes += counted;
    return true;
  }

  /** A record held and not yet in the store (by its record ID), else null. */
  get(recordId: ChunkId): Buffer | null {
    const h = this.held.get(recordId);
    if (!h) return null;
    return (h.record ??= makeDeltaRecord(h.keys, h.baseId, h.newId, h.pages));
  }

  /** After a push: what is held is written once no push has come for `quietMs`. */
  flushSoon(): void {
    if (this.timer) clearTimeout(this.timer);
    this.timer = setTimeout(() => void this.flush(), this.quietMs);
    this.timer.unref();
  }

  /** Writes what is held now; resolves once everything handed over so far is written (or given up): for close and tests. */
  settled(): Promise<void> {
    return this.flush();
  }

  private flush(): Promise<void> {
    if (this.timer) clearTimeout(this.timer);
    this.timer = null;
    this.writing = this.writing.then(async () => {
      const batch = [...this.held];
      if (batch.length === 0) return;
      try {
        for (const [id] of batch) await this.store.put(id, this.get(id)!, { defer: true });
        await this.store.sync();
      } catch {
        // A cache: the store said no (full, gone); later check-outs fetch those chunks whole.
      } finally {
        for (const [id, h] of batch) {
          if (this.held.get(id) === h) {
            this.held.delete(id);
            this.bytes -= h.counted;
          }
        }
      }
    });
    return this.writing;
  }
}
