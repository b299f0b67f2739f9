import { open, readFile, rm, truncate, type FileHandle } from 'node:fs/promises';
import { chunkIdFromBytes, chunkIdToBytes, type ChunkId } from '../../core/chunk-id.js';
import { receiptFromBytes, receiptToBytes } from '../../core/tokens/push-receipt.js';

/** fingerprint 32 ‖ kind 1 (0: a hole, 1: a chunk) ‖ ID 32 ‖ push receipt 16 (zeros for a hole). */
const RECORD = 81;

/** A kept name: the chunk's ID and its push receipt, or null (zeros). */
export type JournalName = { id: ChunkId; receipt: string } | null;

/**
 * The names a transfer server gave a check-in's pages, by their fingerprint (core/delta
 * `pagesFingerprint`), kept in the desktop's vault directory: a check-in killed, or cut off by
 * the link, and run again sends only the chunks not yet named. A name is a function of the
 * fingerprint alone, so an entry never goes stale (if the server has since lost the chunk, the
 * commit says so and it is sent again). Its push receipt binds the check-out, whose vault
 * directory this is, so it holds as long as the entry does. Appended once per push batch, never synced: a lost or
 * torn tail only means sending those chunks again.
 */
export class PushJournal {
  private constructor(
    private readonly path: string,
    private readonly names: Map<string, JournalName>,
    private file: FileHandle | null,
  ) {}

  static async open(path: string): Promise<PushJournal> {
    const names = new Map<string, JournalName>();
    const raw = await readFile(path).catch((err: NodeJS.ErrnoException) => {
      if (err.code === 'ENOENT') return Buffer.alloc(0);
      throw err;
    });
    // Whole records only; anything odd (a torn tail, a byte flipped) is skipped, never trusted as a name.
    for (let at = 0; at + RECORD <= raw.length; at += RECORD) {
      const kind = raw[at + 32];
      if (kind !== 0 && kind !== 1) continue;
      names.set(raw.subarray(at, at + 32).toString('hex'), kind === 1 ? { id: chunkIdFromBytes(raw.subarray(at + 33, at + 65)), receipt: receiptFromBytes(raw.subarray(at + 65, at + RECORD)) } : null);
    }
    // A torn tail is cut off, so the records appended next stay aligned.
    const whole = raw.length - (raw.length % RECORD);
    if (whole !== raw.length) await truncate(path, whole);
    return new PushJournal(path, names, await open(path, 'a', 0o600));
  }

  /** The name given to pages of this fingerprint; undefined when none was. */
  get(fingerprint: string): JournalName | undefined {
    return this.names.get(fingerprint);
  }

  async add(entries: readonly { fingerprint: string; name: JournalName }[]): Promise<void> {
    if (!entries.length || !this.file) return;
    const out = Buffer.alloc(entries.length * RECORD);
    entries.forEach((e, i) => {
      Buffer.from(e.fingerprint, 'hex').copy(out, i * RECORD);
      out[i * RECORD + 32] = e.name ? 1 : 0;
      if (e.name) {
        chunkIdToBytes(e.name.id).copy(out, i * RECORD + 33);
        receiptToBytes(e.name.receipt).copy(out, i * RECORD + 65);
      }
      this.names.set(e.fingerprint, e.name);
    });
    await this.file.write(out);
  }

  async close(): Promise<void> {
    await this.file?.close();
    this.file = null;
  }

  /** Closes and deletes it (the upload committed: its names are in a snapshot now). */
  async remove(): Promise<void> {
    await this.close();
    await rm(this.path, { force: true });
  }
}
