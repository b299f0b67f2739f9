import { z } from 'zod';
import type { ChunkId } from '../../core/chunk-id.js';
import { CarryonError } from '../../core/errors.js';
import type { LineageKeys } from '../../core/keys.js';
import { manifestDigest } from '../../core/chunks/manifest.js';
import { BrokerError, type BrokerClient } from '../../net/broker-client.js';
import { changedManifests, namedOutcome, pagesSource, type ChangedChunk, type DiskReader, type Outcome } from '../../live/disks/changes.js';
import { PushJournal } from '../../live/disks/push-journal.js';

/** Codes with which the broker refuses to begin an upload for a check-out that has ended. */
export const ENDED_CODES = ['wrong-state', 'not-found', 'not-held', 'already-handed-back'];

const Made = z.object({ snapshotId: z.string(), disks: z.array(z.object({ name: z.string(), digest: z.string() })) }).nullable();
const CheckoutOutcome = z.object({ checkout: z.object({ state: z.string() }).loose(), committed: Made, handedBack: Made }).loose();

/**
 * The broker refused to begin an upload: the check-out has ended. Either it ended with this very
 * upload (a check-in or hand-back whose commit was applied and whose answer was lost: a kill, a
 * dead link), which the laptop recognises by the snapshot's manifests being exactly what its own
 * disks give with the names it kept (push journal); it then finishes as that upload would have.
 * Or it ended otherwise (an admin's force-unlock, or a check-in the laptop has changed since): the
 * work stays here, and the user is told how to hand it back as a restore point, never only to discard it.
 */
export async function finishEnded(o: { broker: BrokerClient; state: { checkoutId: string; name: string }; kind: 'checkin' | 'replicate' | 'handback'; keys: LineageKeys; readers: DiskReader[]; touched: ChangedChunk[]; journalPath: string; refusal: BrokerError }): Promise<{ changes: Outcome; snapshotId: string }> {
  const { broker, state, kind } = o;
  let outcome: z.infer<typeof CheckoutOutcome> | null = null;
  try {
    outcome = await broker.call('GET', `/v1/checkouts/${encodeURIComponent(state.checkoutId)}`, undefined, CheckoutOutcome);
  } catch (err) {
    if (!(err instanceof BrokerError)) throw err;
  }
  const made = kind === 'checkin' ? outcome?.committed : kind === 'handback' ? outcome?.handedBack : null;
  if (made) {
    const changes = await sameAsLocal(o, made.disks);
    if (changes) return { changes, snapshotId: made.snapshotId };
  }
  const kept = `Your offline changes are kept on this laptop`;
  const handBack = outcome && !outcome.handedBack && ['cancelled', 'checked_in'].includes(outcome.checkout.state)
    ? `: hand them back with \`carryon handback ${state.name}\` (they become a restore point an administrator can make current), or save them with \`carryon export ${state.name} <file>\`;`
    : `: save them with \`carryon export ${state.name} <file>\`;`;
  const why = outcome?.committed ? `it was checked in as ${outcome.committed.snapshotId}, and this laptop has changes that snapshot lacks` : outcome?.handedBack ? `it was handed back as ${outcome.handedBack.snapshotId}, and this laptop has changes that restore point lacks` : o.refusal.message;
  throw new CarryonError('checkout-gone', `the broker no longer holds check-out ${state.checkoutId} of ${state.name} (${why}). ${kept}${handBack} then remove the local copy with \`carryon discard ${state.name} --yes\``);
}

/**
 * The changes this laptop's disks hold, when the names kept from an earlier push give, for every
 * disk, exactly the manifest `disks` names; null otherwise (a chunk never named, or named otherwise).
 */
async function sameAsLocal(o: { keys: LineageKeys; readers: DiskReader[]; touched: ChangedChunk[]; journalPath: string }, disks: { name: string; digest: string }[]): Promise<Outcome | null> {
  const journal = await PushJournal.open(o.journalPath);
  try {
    const source = pagesSource(o.touched, o.keys, journal);
    const named = new Map<number, ChunkId | null>();
    for (let tag = 0; tag < o.touched.length; tag++) {
      const got = await source.frame(tag, false);
      if (!('known' in got)) return null;
      named.set(tag, got.known);
    }
    const changes = namedOutcome(o.readers, o.touched, named);
    const mine = changedManifests(o.readers.map((r) => r.disk), changes.changes);
    const match = mine.length === disks.length && mine.every((m) => disks.find((d) => d.name === m.name)?.digest === manifestDigest(m.manifest));
    return match ? changes : null;
  } finally {
    await journal.close();
  }
}
