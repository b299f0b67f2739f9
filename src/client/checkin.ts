import { join } from 'node:path';
import { z } from 'zod';
import { CarryonError } from '../core/errors.js';
import type { ChunkId } from '../core/chunk-id.js';
import type { LineageKeys } from '../core/keys.js';
import { topExtents } from '../disk/chain.js';
import { addChain, StorageDaemon } from '../disk/storage-daemon.js';
import { NbdClient } from '../nbd/client.js';
import { pushPages, type PagesSource } from '../transfer/push-pages.js';
import { BrokerError, JobView, type BrokerClient } from './broker-client.js';
import type { DesktopKeys } from './desktop-keys.js';
import type { DeviceIdentity } from './home.js';
import { keepsLocalCopy, parkBases, parkedFrom, stampParked, unlinkVaultBases } from './parked.js';
import { changedManifests, namedOutcome, pagesSource, touchedChunks, type ChangedChunk, type DiskChanges, type DiskReader } from './changes.js';
import { commitUpload } from './commit.js';
import { ENDED_CODES, finishEnded } from './ended-checkout.js';
import { PushJournal } from './push-journal.js';
import { guardUpload } from './layer-guard.js';
import { openDesktopDisks, socketDir, type DesktopDisk } from './disks.js';
import { claimOwner, diskPrefix, specFor } from './holder.js';
import { retryTransfer } from './retry.js';
import { policyBound } from './transfer-rate.js';
import { boundedLimiter } from '../transfer/rate-limit.js';
import { activeJob, findEntry, onlineSession, renewer, type ClientEnv } from './session.js';
import { Vault, type DesktopState } from './vault.js';

/**
 * Opens the chains read-only in a storage daemon for reading the change since the checkpoint:
 * the top layer's extents and the pages they hold. Refused while the desktop runs (its disk is
 * locked by QEMU): shut it down first.
 */
async function withReaders<T>(vault: Vault, state: DesktopState, disks: DesktopDisk[], fn: (readers: DiskReader[]) => Promise<T>): Promise<T> {
  // The top layers' maps (one qemu-img each) are read while the daemon starts: the caller holds
  // the desktop's owner claim, so no run or serve can write the chain meanwhile (and the daemon's
  // image locks then hold it). The daemon's own errors (a disk in use) come first: they say what to do.
  const maps = disks.map((d) => topExtents(d.chain));
  for (const m of maps) m.catch(() => undefined);
  const dir = await socketDir(vault, state.desktopId);
  const qsd = await StorageDaemon.start(dir);
  const clients: NbdClient[] = [];
  try {
    for (const [i, d] of disks.entries()) await addChain(qsd, specFor(d, i, null, true), d.chain.secret, d.chain.baseSecret);
    const socket = join(dir, 'upload.sock');
    await qsd.exportNbd(socket, disks.map((d, i) => ({ node: `${diskPrefix(i)}-top`, name: d.name, writable: false })));
    const readers: DiskReader[] = [];
    for (const [i, d] of disks.entries()) {
      const top = await NbdClient.connect(socket, d.name);
      clients.push(top);
      readers.push({ disk: d, top, extents: await maps[i]! });
    }
    return await fn(readers);
  } finally {
    for (const c of clients) await c.close();
    await qsd.stop();
  }
}

/**
 * Pushes the touched chunks' pages (those a server named in an earlier, interrupted attempt are
 * not sent again), then commits the names; chunks the commit finds collected meanwhile (pushed a
 * day earlier on a slow link) are sent again, once.
 */
async function pushAndCommit(o: { env: ClientEnv; broker: BrokerClient; state: DesktopState; kind: UploadKind; keys: LineageKeys; readers: DiskReader[]; touched: ChangedChunk[]; checkpoint: string | null; job: JobView; journalPath: string }) {
  const { env, broker, state, kind, keys, readers, touched, checkpoint, job } = o;
  let endpoint = job.transfer!;
  const named = new Map<number, ChunkId | null>();
  const receipts = new Map<ChunkId, string>();
  // The user's --limit-rate, never above the policy's bound (transfer-rate.ts).
  const rateLimit = boundedLimiter(env.rateLimit, policyBound(state));
  const push = (source: PagesSource) => retryTransfer({ what: kind, log: env.log, signal: env.signal, beforeRetry: async () => { endpoint = await renewer(broker, job.id)(); } }, () => pushPages({ endpoint, count: touched.length, source, named, receipts, signal: env.signal, rateLimit, renew: renewer(broker, job.id), onProgress: (p) => env.onProgress?.(kind, p) }));
  const journal = await PushJournal.open(o.journalPath);
  try {
    const sent = await push(pagesSource(touched, keys, journal));
    let changes = namedOutcome(readers, touched, named);
    let commit;
    try {
      commit = await commitUpload(broker, state, kind, checkpoint, changes.changes, receipts);
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
    await journal.remove();
    return { changes, sent, commit };
  } finally {
    await journal.close();
  }
}

/**
 * After a committed check-in, if policy keeps local copies: the top is merged into the base
 * (which then equals the new snapshot; resumed on the rerun if killed: `parking` and `mergingTo`
 * in the MACed state) and the base is parked. The caller erases the vault afterwards.
 */
async function parkCheckin(env: ClientEnv, device: DeviceIdentity, vault: Vault, state: DesktopState, keys: DesktopKeys, disks: DesktopDisk[], changes: DiskChanges[], snapshotId: string): Promise<boolean> {
  if (!keepsLocalCopy(state)) return false;
  let next: DesktopState = { ...state, state: 'checking_in', parking: snapshotId };
  for (const m of changedManifests(disks, changes)) {
    const digest = await vault.putManifest(state.desktopId, m.manifest);
    next = { ...next, disks: next.disks.map((d) => (d.name === m.name && d.baseDigest !== digest ? { ...d, mergingTo: digest } : d)) };
  }
  await vault.save(next, keys);
  const merged = (await openDesktopDisks(vault, next, keys)).state;
  return parkBases({ vault, device, password: await env.password(), state: merged, keys, how: 'checkin', disks: merged.disks.map((d) => ({ name: d.name, digest: d.baseDigest, known: null })), log: env.log });
}

/** A check-in killed after its commit, while its bases were merged or parked: finishes that, then erases the vault. */
async function finishParking(env: ClientEnv, device: DeviceIdentity, vault: Vault, state: DesktopState, keys: DesktopKeys, kind: UploadKind) {
  if (kind !== 'checkin') throw new CarryonError('wrong-state', `${state.name} was checked in already; run \`carryon checkin ${state.name}\` to finish putting its local copy away`);
  const release = await claimOwner(vault, state.desktopId, 'checkin', env.log);
  try {
    if (await parkedFrom(vault, state)) {
      await unlinkVaultBases(vault, state);
      await stampParked(vault.home, state.desktopId, keys.vaultKey);
    } else {
      const merged = (await openDesktopDisks(vault, state, keys)).state;
      await parkBases({ vault, device, password: await env.password(), state: merged, keys, how: 'checkin', disks: merged.disks.map((d) => ({ name: d.name, digest: d.baseDigest, known: null })), log: env.log })
        .catch((err: unknown) => env.log(`no parked copy kept of ${state.name}: ${(err as Error).message}`));
    }
  } finally {
    await release();
  }
  await vault.wipe(state.desktopId);
  env.log(`checked in ${state.name} (the check-in had been committed before it was cut off)`);
  return { snapshotId: state.parking!, changedChunks: 0, chunksSent: 0, bytesSent: 0 };
}

/** Check-in, replicate, or hand-back (the work of a check-out that ended elsewhere, as a restore point). */
export type UploadKind = 'checkin' | 'replicate' | 'handback';

/** Check-in, replicate or hand-back: send only the chunks changed since the checkpoint, then commit. */
export async function upload(env: ClientEnv, desktopRef: string, kind: UploadKind) {
  const { device, broker } = await onlineSession(env);
  const vault = await Vault.open(env.home);
  try {
    const found = await vault.find(desktopRef);
    if (found.state === 'transferring') throw new CarryonError('wrong-state', `${found.name} is still being checked out`);
    const opened0 = await vault.openKeys(device, await env.password(), found);
    const keys = opened0.keys;
    let state = opened0.state;
    if (state.parking) return await finishParking(env, device, vault, state, keys, kind);
    const release = await claimOwner(vault, state.desktopId, kind === 'handback' ? 'checkin' : kind, env.log);
    let outcome;
    try {
      const opened = await openDesktopDisks(vault, state, keys);
      state = await guardUpload(vault, opened.state, keys, env.log);
      outcome = await withReaders(vault, state, opened.disks, async (readers) => {
        const touched = touchedChunks(readers);
        // The version this upload is based on: how a commit whose answer was lost is recognised.
        const checkpoint = (await findEntry(broker, state.desktopId)).checkout?.snapshotId ?? null;
        const journalPath = join(vault.desktopDir(state.desktopId), 'pushed-receipts.journal');
        let begin;
        try {
          // Repeatable: a second begin (also accepted in checking_in) ends the first one's job and opens another.
          begin = await broker.call('POST', `/v1/checkouts/${state.checkoutId}/${kind}`, {}, z.object({ job: JobView }), {}, { repeatable: true });
        } catch (err) {
          // The check-out ended: with this upload (its answer lost), or otherwise (offline work is
          // then never deleted on an ambiguous answer: the user is told how to hand it back).
          if (!(err instanceof BrokerError) || !ENDED_CODES.includes(err.code)) throw err;
          const ended = await finishEnded({ broker, state, kind, keys, readers, touched, journalPath, refusal: err });
          return { changes: ended.changes, sent: { chunksMoved: 0, bytesMoved: 0, refetched: 0 }, commit: { snapshotId: ended.snapshotId }, recovered: true };
        }
        if (kind === 'checkin') await vault.save({ ...state, state: 'checking_in', jobId: begin.job.id }, keys);
        const job = await activeJob(env, broker, begin.job);
        return { ...(await pushAndCommit({ env, broker, state, kind, keys, readers, touched, checkpoint, job, journalPath })), recovered: false };
      });
      if (kind === 'replicate') {
        // The restore point becomes the base: merge the top into it (resumed on the next open if killed).
        let next: DesktopState = { ...state, lastReplicationAt: new Date().toISOString() };
        for (const m of changedManifests(opened.disks, outcome.changes.changes)) {
          const digest = await vault.putManifest(state.desktopId, m.manifest);
          next = { ...next, disks: next.disks.map((d) => (d.name === m.name ? { ...d, mergingTo: digest } : d)) };
        }
        await vault.save(next, keys);
        await openDesktopDisks(vault, next, keys);
      }
      if (kind === 'checkin') {
        // The laptop keeps the desktop as checked in (policy keepLocalCopy): the next check-out moves only what changed.
        await parkCheckin(env, device, vault, state, keys, opened.disks, outcome.changes.changes, outcome.commit.snapshotId).catch((err: unknown) => env.log(`no parked copy kept of ${state.name}: ${(err as Error).message}`));
      }
    } finally {
      await release();
    }
    const { changes, sent, commit, recovered } = outcome;
    const lost = recovered ? ' (the broker had committed it before; its answer was lost)' : '';
    if (kind === 'checkin') {
      await vault.wipe(state.desktopId);
      env.log(`checked in ${state.name}: ${changes.changedChunks} changed chunks, ${sent.chunksMoved} sent (${sent.bytesMoved} bytes); snapshot ${commit.snapshotId}${lost}`);
    } else if (kind === 'handback') {
      // The work is on the server now; the check-out had ended, so the local copy goes as after a check-in.
      await vault.wipe(state.desktopId);
      env.log(`handed back ${state.name}: restore point ${commit.snapshotId}${lost}, ${changes.changedChunks} changed chunks; it is not the current version until an administrator restores it`);
    } else {
      env.log(`replicated ${state.name}: restore point ${commit.snapshotId}, ${sent.chunksMoved} chunks sent (${sent.bytesMoved} bytes)`);
    }
    return { snapshotId: commit.snapshotId, changedChunks: changes.changedChunks, chunksSent: sent.chunksMoved, bytesSent: sent.bytesMoved };
  } finally {
    await broker.close();
  }
}
