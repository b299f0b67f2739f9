import { createPublicKey } from 'node:crypto';
import { join } from 'node:path';
import { z } from 'zod';
import { fetchUnlockShare, sealOnlineWrap } from '../vault/online-unlock.js';
import { POLICY_DEFAULTS } from '../../core/policy.js';
import { traced } from '../../files/trace.js';
import { CarryonError } from '../../core/errors.js';
import { decodeLineageKeys } from '../../core/keys.js';
import { verifyLease } from '../../core/tokens/lease.js';
import { decodeManifest, encodedDigest } from '../../core/chunks/manifest.js';
import { baseBlockdev, layerSecret } from '../../disk/chain.js';
import { measureLayersAhead, recordLayers } from '../../live/disks/layer-guard.js';
import { Qcow2BaseWriter } from '../../disk/qcow2/qcow2-base-writer.js';
import { UnsupportedImage } from '../../disk/qcow2/qcow2-format.js';
import { addLayer, StorageDaemon } from '../../disk/storage-daemon.js';
import { NbdClient } from '../../nbd/client.js';
import { TransferSession } from '../../transfer-client/client.js';
import { askWithNewerFields, BrokerClient, CheckoutResponse, CheckoutView, JobView } from '../../net/broker-client.js';
import { newDesktopKeys, type DesktopKeys } from '../../live/disks/desktop-keys.js';
import { createMissingLayers, diskDir, socketDir, type DesktopDisk } from '../../live/disks/disks.js';
import { openDesktopDisks } from '../../live/disks/open.js';
import { finishPark } from './checkin.js';
import { clearCheckoutFailure, readCheckoutFailure, recordCheckoutFailure } from './checkout-failure.js';
import { ChunkFailedAuthentication, fillDirect, readFilled, type BaseSink } from '../../live/fill/fill-direct.js';
import { clearDeltaBases, readDeltaBases } from '../../live/fill/delta-bases.js';
import { mintToken } from '../vault/guards.js';
import { claimOwner, diskPrefix, readOwner, specFor } from '../../live/fill/holder.js';
import { hostFacts, type DeviceIdentity } from '../vault/home.js';
import { closeSiblingCopies, copySiblingChunks, findSiblingCopies, type SiblingCopies } from '../vault/local-sources.js';
import { dataBytes, LocalProgressReporter, presentBytes } from '../../live/fill/local-progress.js';
import { resetClock } from '../vault/key-release.js';
import { retryTransfer } from '../session/retry.js';
import { rememberRate, transferLimiter } from '../session/transfer-rate.js';
import { activeJob, findEntry, onlineSession, pinnedBrokerKey, renewer, type ClientEnv } from '../session/session.js';
import { Vault, type DesktopState } from '../vault/vault.js';
import { startWrapKey, type PendingWrapKey } from '../vault/kdf.js';
import { adoptParked, openOwnParked, parkPolicy, readParked, unfinishedCheckin, type OpenedParked } from '../vault/parked.js';
import { discardLeftover, HandoverPrefetch, HandoverWait, waitForHandover, type Adopted } from '../session/handover.js';

/**
 * Check-out: the broker locks the desktop and names the checkpoint; the laptop makes an empty
 * encrypted chain per disk and fills each base from the transfer server. Interrupted (Ctrl-C,
 * kill, lost link), it resumes where the base stopped.
 */
export async function checkout(env: ClientEnv, desktopRef: string) {
  const { device, broker, user } = await traced('login', () => onlineSession(env));
  const vault = await Vault.open(env.home);
  try {
    const entry = await traced('find-entry', () => findEntry(broker, desktopRef));
    let found = (await traced('vault-list', () => vault.list())).find((s) => s.desktopId === entry.id);
    // A check-in this laptop began and that was cut off: finished here if its commit is known, else left whole.
    if (found && (found.state === 'checking_in' || found.parking)) {
      await finishCutOffCheckin(env, device, vault, found, user);
      found = undefined; // its vault is erased: the check-out goes on from the parked copy
    }
    let state: DesktopState;
    let keys: DesktopKeys;
    let parked: OpenedParked | null = null;
    let prefetched: { chunks: number; kept: number; dropped: number; completeAfterMs: number | null } | null = null;
    /** The vault's password wrap while its KDF still runs beside the transfer (kdf.ts `startWrapKey`). */
    let finishing: PendingWrapKey | null = null;
    if (found && found.state === 'transferring') {
      // A check-out that failed for good (a damaged snapshot) would only fail again: say so, fetch nothing.
      const failed = await readCheckoutFailure(vault, found.desktopId);
      if (failed) throw new CarryonError('damaged-snapshot', failed.message);
      ({ keys, state } = await vault.openKeys(device, await env.password(), found, { unlockShare: await fetchUnlockShare(broker, found, env.log) }));
      // Cut off before its password wrap was kept: that KDF runs beside the rest of the transfer, under the salt the state names.
      if (!state.keys.wrapped) finishing = startWrapKey(device, env.password, state.keys);
      env.log(`resuming the check-out of ${entry.name}`);
    } else {
      if (found) {
        // Nothing left to do (e.g. `carryon serve` or `run` finished the download): say so, succeed.
        env.log(`${entry.name} is already checked out to this device and entirely local`);
        return { desktopId: entry.id, checkoutId: found.checkoutId, chunksMoved: 0, bytesMoved: 0, refetched: 0, reusedChunks: 0, copiedChunks: 0, rejectedLocalChunks: 0, prefetched: null };
      }
      // This user's parked copy of the desktop: one with an online wrap opens with the share the
      // answer brings for the check-out it came from (no KDF); an older one opens now, while the
      // broker is asked, and the new vault's wrap reuses the key that opened it (one KDF, kdf.ts).
      // Otherwise the new vault's password wrap is derived from now on, beside the broker's answer
      // and the transfer, and only awaited once the desktop is local (the online wrap opens it meanwhile).
      const own = await readParked(env.home, entry.id).then((r) => (r?.user === user ? r : null), () => null);
      const parkedFrom = own?.online?.checkoutId;
      const opening = own && !parkedFrom ? traced('open-parked(kdf)', () => openOwnParked(env.home, entry.id, user, device, env.password)) : null;
      const pendingWrap = opening ? null : startWrapKey(device, env.password);
      const brokerKey = await traced('broker-key', () => pinnedBrokerKey(broker, device));
      const host = await traced('host-facts', () => hostFacts(env.home));
      // Repeatable: a check-out this device began and that is still transferring is resumed by
      // the broker (same check-out, same job), not refused or started twice (broker/checkouts.ts).
      // parkedFrom: a broker from before parked copies' online wraps refuses it and is asked without (the parked copy then opens with the password).
      const ask = () => askWithNewerFields((body) => broker.call('POST', `/v1/desktops/${entry.id}/checkout`, body, z.union([CheckoutResponse, HandoverWait]), {}, { repeatable: true }),
        { deviceId: device.info.deviceId, host: { os: host.os, cpus: host.cpus, ramBytes: host.ramBytes, freeDiskBytes: host.freeDiskBytes } }, parkedFrom ? { parkedFrom } : null);
      let answer = await traced('checkout-call', ask);
      // A desktop running on a datacenter host: the host shuts it down and sends back what it wrote; then the check-out goes on from that.
      // Meanwhile the snapshot it ran from is fetched (not with a parked copy here: that one already holds most of it).
      let early: HandoverPrefetch | null = null;
      try {
        for (let i = 0; 'handover' in answer; i++) {
          if (i === 3) throw new CarryonError('handover', `the host has not handed ${entry.name} over yet: run the same command again`);
          if (!early && answer.prefetch && !(await readParked(env.home, entry.id))) {
            early = new HandoverPrefetch({ env, vault, broker, device, brokerKey, desktopId: entry.id, checkoutId: answer.checkout.id, view: answer.prefetch });
          }
          await waitForHandover(env, broker, entry.name, answer.checkout.id, answer.handover.step);
          answer = await ask();
        }
      } catch (err) {
        await early?.discard();
        throw err;
      }
      const res = answer;
      parked = opening ? await opening : parkedFrom ? await traced('open-parked(online)', () => openOwnParked(env.home, entry.id, user, device, env.password, res.parkUnlock)) : null;
      let adopted: Adopted | null = null;
      let saved = false;
      try {
        // The lease must verify against the broker key pinned now, inside the vault, before anything is kept.
        const lease = verifyLease(res.lease, brokerKey, { now: new Date(), deviceId: device.info.deviceId!, desktopId: entry.id });
        // Not this run's: whatever an earlier run left without a state (a kill mid-handover) is erased, never taken for the checkpoint.
        if (!early) await discardLeftover(vault, entry.id);
        const disks: DesktopState['disks'] = [];
        const manifests = [];
        for (const d of res.disks) {
          const raw = Buffer.from(d.manifest, 'base64');
          if (encodedDigest(raw) !== d.digest) throw new CarryonError('bad-manifest', `manifest of ${d.name} does not match its digest`);
          const m = decodeManifest(raw);
          // Stored as the broker sent them (the bytes its digest names), not encoded again.
          await vault.putManifest(entry.id, raw);
          vault.offerManifest(entry.id, d.digest, m);
          manifests.push({ name: d.name, digest: d.digest, manifest: m });
          disks.push({ name: d.name, baseDigest: d.digest, complete: false, mergingTo: null, shapes: { base: null, top: null }, baseVerified: null, topClosed: null, top: 'top.qcow2', under: null });
        }
        const lockDigest = await mintToken(vault.desktopDir(entry.id));
        const stateWith = (wrapped: DesktopState['keys']): DesktopState => ({
          desktopId: entry.id, name: entry.name, user, checkoutId: res.checkout.id, state: 'transferring', jobId: res.job.id, keys: wrapped, lease: res.lease,
          config: { ...res.config, exportAllowed: res.policy?.exportAllowed?.value === true, maxTransferRateKBps: Number(res.policy?.maxTransferRateKBps?.value ?? 0), replicationRateKBps: Number(res.policy?.replicationRateKBps?.value ?? POLICY_DEFAULTS.replicationRateKBps), ...parkPolicy(res.policy) }, localConfig: {}, disks,
          lastReplicationAt: null, lastReplicaKind: null, lockDigest, layerSecrets: 'per-layer', layersOpen: false, damaged: null, parking: null,
        });
        // What was fetched ahead: kept where its chunk IDs are the checkpoint's, the rest unmapped, all before the state names the checkpoint.
        adopted = early ? await early.adopt(res.keys, manifests, stateWith) : null;
        keys = adopted?.keys ?? newDesktopKeys(decodeLineageKeys(res.keys), brokerKey, createPublicKey(device.privateKey));
        // Deferred where it can be: a broker that gives the online share (the vault opens with it until the wrap is kept).
        const defer = !adopted && !parked?.wrapKey && pendingWrap && res.unlock ? pendingWrap : null;
        const wrapped: DesktopState['keys'] = adopted?.wrapped ?? (defer ? { salt: defer.salt, N: defer.N }
          : await traced('wrap-keys', async () => Vault.wrapKeys(device, await env.password(), keys, entry.id, parked?.wrapKey ?? (pendingWrap ? await pendingWrap.key : null))));
        // The online wrap (online-unlock.ts): check-in, replicate and a resumed check-out open the vault without the KDF.
        const online = res.unlock ? await sealOnlineWrap(device, await env.password(), res.unlock, keys, entry.id, res.checkout.id) : undefined;
        state = { ...stateWith({ ...wrapped, ...(online ? { online } : {}) }), localConfig: await vault.readLocalConfig(entry.id) };
        await traced('vault-save', () => vault.save(state, keys));
        saved = true;
        finishing = defer;
        await early?.adopted();
        await traced('reset-clock', () => resetClock(vault, state, keys, lease.issuedAt, device));
        prefetched = adopted ? { chunks: adopted.prefetchedChunks, kept: adopted.keptChunks, dropped: adopted.droppedChunks, completeAfterMs: early!.completeAfterMs } : null;
        if (adopted) env.log(`fetched ahead during the handover: ${adopted.prefetchedChunks} chunks, ${adopted.keptChunks} of them unchanged in the checkpoint (${adopted.droppedChunks} the guest changed are fetched again)`);
      } catch (err) {
        // Until the state names the checkpoint, what was fetched ahead is nobody's: erased.
        if (!saved) await early?.discard();
        throw err;
      }
      env.log(`checked out ${entry.name}: checkout ${res.checkout.id}, lease until ${res.checkout.leaseExpiresAt}`);
    }
    const release = await traced('claim-owner', () => claimOwner(vault, state.desktopId, 'checkout', env.log));
    // This check-out's --limit-rate stays the desktop's own: `run`, `serve` or a rerun that continue the download keep it.
    await rememberRate(env, vault, state.desktopId);
    let making: Promise<void> = Promise.resolve();
    const finishWrap = async () => {
      const pending = finishing;
      finishing = null;
      if (pending) await traced('wrap-keys(beside)', async () => vault.addPasswordWrap(device, await env.password(), state.desktopId, keys, pending));
    };
    try {
      // A parked copy of this desktop (kept by an earlier check-in, rollback or cancel) becomes the base: only what differs travels.
      const reused = await traced('adopt-parked', () => adoptParked({ vault, device, password: env.password, state, keys, log: env.log, opened: parked }));
      const { tops } = await traced('create-layers', () => diskFullIsClear(env.home, () => createMissingLayers(vault, state, keys)));
      making = tops;
      const filled = await traced('fill', () => fillFromBroker(env, vault, broker, device, state, keys)).catch(async (err: unknown) => {
        throw err instanceof ChunkFailedAuthentication ? await damagedSnapshot(env, vault, broker, state, err) : err;
      });
      await traced('tops-made', () => diskFullIsClear(env.home, () => tops));
      // Kept before anything says the desktop is local: from here it opens offline.
      await finishWrap();
      if (!filled.complete) throw new CarryonError('paused', 'check-out stopped; what arrived is kept — run the same command again to resume');
      // The layers' shapes are measured while the broker records the transfer (used below only if no file changed since).
      const shapes = measureLayersAhead(vault, filled.state, keys);
      // Repeatable: a check-out already marked transferred is answered as it is.
      await traced('transferred-call', () => broker.call('POST', `/v1/checkouts/${state.checkoutId}/transferred`, {}, z.object({ checkout: CheckoutView }), {}, { repeatable: true }));
      // The bases were written here from chunks checked against their IDs: their shapes and stamps are the reference from now on.
      // A reused parked base is as trusted as when it was parked: its file was not written since (parked.ts checks its stamp).
      const copiedChunks = reused.copiedChunks + filled.copiedChunks;
      // Copied chunks were checked against their IDs like fetched ones.
      // Chunks fetched ahead during a handover were checked against their IDs like the others.
      await traced('record-layers', () => recordLayers(vault, { ...filled.state, state: 'checked_out', jobId: null }, keys, { verifiedBases: filled.bytesMoved > 0 || reused.reusedChunks > 0 || copiedChunks > 0 || (prefetched?.kept ?? 0) > 0, ahead: shapes }));
      await clearCheckoutFailure(vault, state.desktopId);
      env.log(`${entry.name} is local (${filled.bytesMoved} bytes pulled); safe to go offline`);
      return { desktopId: entry.id, checkoutId: state.checkoutId, chunksMoved: filled.chunksMoved, bytesMoved: filled.bytesMoved, refetched: 0, reusedChunks: reused.reusedChunks, copiedChunks, rejectedLocalChunks: reused.rejectedChunks + filled.rejectedChunks, prefetched };
    } finally {
      // A top still being made belongs to this run: let it finish (or fail) before anyone else looks.
      await making.catch(() => undefined);
      // Stopped or failed: the password's wrap is kept all the same, so what arrived opens offline too.
      await finishWrap().catch((err: unknown) => env.log(`the vault's password wrap was not kept (${(err as Error).message}): run the same command again while online`));
      await release();
    }
  } finally {
    await broker.close();
  }
}

/**
 * A check-in of this desktop on this laptop that did not finish. Committed (`parking`, in the state
 * as the vault's MAC vouches for it: saved only once the broker answered the commit), its park is
 * finished as the check-in's rerun would and the check-out goes on from the parked copy. Otherwise
 * the commit may or may not have happened: nothing is touched, the rerun of the check-in decides.
 */
async function finishCutOffCheckin(env: ClientEnv, device: DeviceIdentity, vault: Vault, found: DesktopState, user: string): Promise<void> {
  if (found.user !== user) throw new CarryonError('wrong-state', `${found.user}'s check-in of ${found.name} on this laptop did not finish: ${found.user} must run \`carryon checkin ${found.name}\` to finish it`);
  const holder = await readOwner(vault, found.desktopId);
  if (holder) throw new CarryonError('disk-busy', `${found.name} is in use by \`carryon ${holder.kind}\` (pid ${holder.pid}): let it finish, then check it out`);
  const { state, keys, wrapKey } = await vault.openKeys(device, await env.password(), found);
  if (!state.parking) throw new CarryonError('wrong-state', `${state.name}: ${unfinishedCheckin(state)}; nothing was discarded: check it out once that is done`);
  env.log(`${state.name} was checked in (snapshot ${state.parking}); putting its local copy away first`);
  await finishPark(env, device, vault, state, keys, wrapKey);
}

/**
 * A chunk that failed authentication 3 times: the broker is told (it checks its own copy, audits,
 * and stops handing out a damaged snapshot), `status` shows the check-out as failed, and the error
 * says what to do instead of inviting a rerun that would fail the same way.
 */
async function damagedSnapshot(env: ClientEnv, vault: Vault, broker: BrokerClient, state: DesktopState, err: ChunkFailedAuthentication): Promise<CarryonError> {
  let verdict = 'the broker could not be told';
  try {
    const r = await broker.call('POST', `/v1/checkouts/${state.checkoutId}/damaged`, { chunkId: err.chunkId, detail: err.detail }, z.object({ damaged: z.boolean(), message: z.string().nullable() }));
    verdict = r.damaged ? (r.message ?? 'the broker confirmed the damage') : "the datacenter's copy of that chunk is intact: the fault lies between the store and this laptop";
  } catch (e) {
    verdict = `the broker could not be told (${(e as Error).message})`;
  }
  const message = `check-out of ${state.name} failed: damaged snapshot — chunk ${err.chunkId.slice(0, 12)}… failed authentication 3 times; ${verdict}. Run \`carryon cancel ${state.name}\` to end this check-out`;
  await recordCheckoutFailure(vault, state.desktopId, 'damaged snapshot', message);
  return new CarryonError('damaged-snapshot', message);
}

/**
 * Fills every incomplete base over the job's transfer ticket: no VM is attached, so the chunks
 * go straight into the bases (parallel streams; encrypted and written by Node, or by QEMU for an
 * image the Node writer does not take), holes never touched.
 */
async function fillFromBroker(env: ClientEnv, vault: Vault, broker: BrokerClient, device: DeviceIdentity, state: DesktopState, keys: DesktopKeys) {
  const opened = await traced('open-disks', () => openDesktopDisks(vault, state, keys));
  const incomplete = opened.disks.filter((d) => !d.entry.complete);
  if (incomplete.length === 0) return { state: opened.state, complete: true, bytesMoved: 0, chunksMoved: 0, copiedChunks: 0, rejectedChunks: 0 };
  const dir = await socketDir(vault, state.desktopId);
  let qsd: StorageDaemon | null = null;
  let sinks: BaseSink[] = [];
  let reporter: LocalProgressReporter | null = null;
  let session: TransferSession | null = null;
  let siblings: Promise<SiblingCopies | null> | null = null;
  try {
    const openSinks = async () => {
      try {
        for (const d of incomplete) sinks.push(await traced('writer-open', () => Qcow2BaseWriter.open(d.chain.files.base, layerSecret(d.chain, 'base'), d.base.chunkSize)));
      } catch (err) {
        if (!(err instanceof UnsupportedImage)) throw err;
        await Promise.all(sinks.splice(0).map((s) => s.close()));
        env.log(`writing through QEMU: ${err.message}`);
        qsd = await StorageDaemon.start(dir);
        sinks = await nbdSinks(qsd, opened.disks, join(dir, 'fill.sock'));
      }
    };
    // The broker's answer, the writers (a key slot, the tables, a thread), the local records and the
    // sibling copies this laptop holds are independent: side by side. Settled all before anything
    // throws: a writer still opening would otherwise outlive the `finally` that closes it.
    // Each disk's chunks already durable, read once for both the delta bases and the sibling copies.
    const held = Promise.all(incomplete.map(async (disk) => {
      const dir = diskDir(vault, state.desktopId, disk.name);
      return { disk, dir, filled: await readFilled(dir) };
    }));
    siblings = traced('sibling-sources', async () => findSiblingCopies({ vault, device, password: env.password, state, keys, log: env.log, disks: await held }));
    const [job, , records, siblingCopies] = await settledAll([
      traced('active-job', async () => activeJob(env, broker, await broker.call('GET', `/v1/jobs/${state.jobId}`, undefined, JobView))),
      openSinks(),
      // Chunks a parked base keeps where the checkpoint changed them: only their changed pages travel, where the server knows them.
      traced('read-deltas', async () => Promise.all((await held).map(async ({ disk, dir, filled }) => ({ dir, filled, bases: await readDeltaBases(dir, keys, state.desktopId, disk.name, filled) })))),
      siblings,
    ] as const);
    const transfer = new TransferSession(job.transfer!, renewer(broker, job.id));
    session = transfer;
    const targets = incomplete.map((disk, i) => ({ disk, dir: records[i]!.dir, sink: sinks[i]!, bases: records[i]!.bases }));
    // The desktop's disks already complete count as present (the percentage is of the whole desktop).
    const whole = opened.disks.filter((d) => d.entry.complete).reduce((n, d) => n + dataBytes(d.base), 0);
    reporter = new LocalProgressReporter({ vault, desktopId: state.desktopId, broker, jobId: job.id });
    const r = reporter;
    // Chunks this laptop holds for clones of the same lineage are copied first: the transfer server sees only the rest.
    // Copying is done work like fetching: every view counts it (and says how much of it was copied here).
    const copied = { copiedChunks: 0, copiedBytes: 0, fetchedChunks: 0 };
    const present = whole + records.reduce((n, r, i) => n + presentBytes(incomplete[i]!.base, r.filled), 0);
    const total = whole + targets.reduce((n, t) => n + dataBytes(t.disk.base), 0);
    const local = !siblingCopies ? { copiedChunks: 0, rejectedChunks: 0 } : await traced('copy-siblings', () => copySiblingChunks({ keys, disks: targets, log: env.log, signal: env.signal, onCopied: (bytes) => {
      copied.copiedChunks++;
      copied.copiedBytes += bytes;
      const p = { bytesDone: 0, chunksDone: 0, chunksTotal: 0, rate: 0, etaSeconds: null, bytesLocal: present + copied.copiedBytes, bytesTotal: total, chunksCopied: copied.copiedChunks };
      env.onProgress?.('check-out', p);
      r.setCounts(copied);
      r.update(p.bytesLocal, p.bytesTotal, 0);
    } }, siblingCopies));
    const renew = renewer(broker, job.id);
    const rateLimit = await traced('limiter', () => transferLimiter(env, vault, state));
    const moved = await traced('fetch', () => diskFullIsClear(env.home, () => retryTransfer({ what: 'check-out', log: env.log, signal: env.signal, beforeRetry: async () => transfer.setEndpoint(await renew()) }, () =>
      fillDirect({ disks: targets, session: transfer, keys, signal: env.signal, rateLimit, onProgress: (p) => {
        const local = { ...p, bytesLocal: whole + (p.bytesLocal ?? 0), bytesTotal: whole + (p.bytesTotal ?? 0), chunksCopied: copied.copiedChunks };
        env.onProgress?.('check-out', local);
        r.setCounts({ ...copied, fetchedChunks: p.chunksDone });
        // For `status` in another process and the admin views: once a second is enough.
        r.update(local.bytesLocal, local.bytesTotal, p.bytesDone);
      } }),
    )));
    const done: DesktopState = { ...opened.state, disks: opened.state.disks.map((d) => ({ ...d, complete: true })) };
    await traced('vault-save', () => vault.save(done, keys));
    await Promise.all(targets.map((t) => clearDeltaBases(t.dir)));
    return { state: done, complete: true, ...moved, ...local };
  } catch (err) {
    if ((err as CarryonError).code === 'aborted') return { state: opened.state, complete: false, bytesMoved: 0, chunksMoved: 0, copiedChunks: 0, rejectedChunks: 0 };
    throw err;
  } finally {
    await traced('fill-close', async () => {
      await siblings?.then(closeSiblingCopies, () => undefined);
      await Promise.all(sinks.map((s) => s.close()));
      await qsd?.stop();
      await session?.close();
      await reporter?.settle();
    });
  }
}

/** Promise.all that lets every promise settle before it throws the first failure (nothing is left running behind a `finally`). */
async function settledAll<T extends readonly unknown[]>(promises: { [K in keyof T]: Promise<T[K]> }): Promise<T> {
  const results = await Promise.allSettled(promises);
  const failed = results.find((r): r is PromiseRejectedResult => r.status === 'rejected');
  if (failed) throw failed.reason;
  return results.map((r) => (r as PromiseFulfilledResult<unknown>).value) as unknown as T;
}

/** The incomplete bases exported writable by a storage daemon (their tops may still be in the making). */
async function nbdSinks(qsd: StorageDaemon, disks: DesktopDisk[], socketPath: string): Promise<BaseSink[]> {
  // Each keeps its position in the chain list: the daemon's node names are numbered by it.
  const incomplete = disks.flatMap((d, i) => (d.entry.complete ? [] : [{ d, prefix: diskPrefix(i), spec: specFor(d, i, null) }]));
  for (const { d, spec } of incomplete) await addLayer(qsd, baseBlockdev(spec), spec.baseSecretId ?? spec.secretId, layerSecret(d.chain, 'base'));
  await qsd.exportNbd(socketPath, incomplete.map(({ d, prefix }) => ({ node: `${prefix}-base`, name: `${d.name}.fill`, writable: true })));
  const sinks: BaseSink[] = [];
  for (const { d } of incomplete) {
    const client = await NbdClient.connect(socketPath, `${d.name}.fill`);
    sinks.push({ write: (index, plain) => client.write(index * d.base.chunkSize, plain), persist: () => client.flush(), close: () => client.close() });
  }
  return sinks;
}

/** A full disk mid-transfer says so, and how to go on (what arrived is kept; the rerun resumes). */
async function diskFullIsClear<T>(home: string, fn: () => Promise<T>): Promise<T> {
  try {
    return await fn();
  } catch (err) {
    const code = (err as { code?: string }).code;
    const text = (err as Error).message ?? '';
    if (code !== 'ENOSPC' && code !== 'SQLITE_FULL' && !/No space left on device/i.test(text)) throw err;
    const { freeDiskBytes } = await hostFacts(home).catch(() => ({ freeDiskBytes: 0 }));
    throw new CarryonError('disk-full', `the disk holding ${home} is full (${Math.floor(freeDiskBytes / 1024)} KiB free): free some space and run \`carryon checkout\` again; what arrived is kept`);
  }
}
