import { join } from 'node:path';
import { z } from 'zod';
import { CarryonError } from '../../core/errors.js';
import { copyOnReadSafe } from '../../disk/layer-template.js';
import { effectiveConfig } from '../vault/guards.js';
import { addChain, StorageDaemon } from '../../disk/storage-daemon.js';
import { BrokerClient, CheckoutView, JobView } from '../../net/broker-client.js';
import { finishPendingReuse, unfinishedCheckin } from '../vault/parked.js';
import { createMissingLayers, diskDir, socketDir } from '../../live/disks/disks.js';
import { openDesktopDisks, settleLiveLayers } from '../../live/disks/open.js';
import { claimOwner, diskPrefix, fillDisks, RemoteSource, specFor, type HeldDesktop, type OwnerKind } from '../../live/fill/holder.js';
import { loadDevice, type DeviceIdentity } from '../vault/home.js';
import { onlineSession, type ClientEnv } from '../session/session.js';
import { recordEvent } from '../../live/disks/events.js';
import { startLiveControl } from '../../live/live-holder.js';
import { checkLayers, markLayersOpen, recordLayers, verifyInBackground } from '../../live/disks/layer-guard.js';
import { transferLimiter } from '../session/transfer-rate.js';
import { Vault, type DesktopState } from '../vault/vault.js';
import { releaseKeys, unlock } from '../vault/key-release.js';
import { fetchUnlockShare } from '../vault/online-unlock.js';
import { startWrapKey } from '../vault/kdf.js';
import { siblingReader } from '../vault/local-sources.js';

/**
 * A check-out killed before its password wrap was kept (its KDF runs beside the transfer,
 * checkout.ts) opens with the check-out's online share only; the wrap is made now, so from here
 * on it opens offline as any other. Offline, the vault says to run the check-out again.
 */
async function unlockCutOff(env: ClientEnv, vault: Vault, device: DeviceIdentity, found: DesktopState) {
  const password = await env.password();
  const { broker } = await onlineSession(env, device, found.checkoutId).catch((err: unknown) => {
    if (!(err instanceof CarryonError) || err.code !== 'offline') throw err; // the broker answered: its own words
    throw new CarryonError('vault-incomplete', `the check-out of ${found.name} was cut off before its keys were kept for offline use, and the broker cannot be reached (${(err as Error).message}): run \`carryon checkout ${found.name}\` again once online`);
  });
  try {
    const opened = await vault.openKeys(device, password, found, { unlockShare: await fetchUnlockShare(broker, found, env.log) });
    await vault.addPasswordWrap(device, password, found.desktopId, opened.keys, startWrapKey(device, env.password, opened.state.keys));
    return await releaseKeys(vault, opened);
  } finally {
    await broker.close();
  }
}

/**
 * Opens a held desktop for running: the vault refuses a locked desktop or an expired lease before
 * any disk opens. While the check-out is still in flight, the remote checkpoint backs each
 * incomplete base, and the fill goes on inside whichever QEMU holds the chain.
 */
export async function holdDesktop(env: ClientEnv, desktopRef: string, kind: OwnerKind, opts: { dryRun?: boolean } = {}): Promise<HeldDesktop> {
  const device = await loadDevice(env.home);
  const vault = await Vault.open(env.home);
  const found = await vault.find(desktopRef);
  // Progress lines on stderr: the key derivations below take seconds, and silence reads as a hang.
  env.log(`opening ${found.name}: unlocking its keys…`);
  const unlocked = found.keys.wrapped ? await unlock(vault, device, await env.password(), found) : await unlockCutOff(env, vault, device, found);
  const { keys } = unlocked;
  // Checked in already (the broker holds the commit) and being put away: what ran now would be lost with the vault.
  if (unlocked.state.parking) throw new CarryonError('wrong-state', `${found.name} is ${unfinishedCheckin(unlocked.state)!}`);
  // A dry run only prints the command line: the audit must not show it as the desktop having run.
  await recordEvent(env.home, opts.dryRun ? `${kind}-dry-run` : kind, found.desktopId);
  // The broker's config from check-out (MACed), restricted by what the agent learned since.
  const state = { ...unlocked.state, config: await effectiveConfig(vault.desktopDir(found.desktopId), unlocked.state.config), localConfig: await vault.readLocalConfig(found.desktopId) };
  // The vault stores the MACed config, never the view the desktop runs with (restricted config, local settings).
  const stored = (s: DesktopState): DesktopState => ({ ...s, config: unlocked.state.config, localConfig: unlocked.state.localConfig });
  const view = (s: DesktopState): DesktopState => ({ ...s, config: state.config, localConfig: state.localConfig });
  const release = await claimOwner(vault, found.desktopId, kind, env.log);
  let broker: BrokerClient | null = null;
  try {
    env.log('preparing the encrypted disk layers…');
    const checked = await checkLayers(vault, unlocked.state, keys, env.log);
    // A parked base taken over by a check-out that a kill cut short: its stale chunks go first (parked.ts).
    await finishPendingReuse(vault, checked, keys, env.log);
    await (await createMissingLayers(vault, checked, keys)).tops;
    const opened = await openDesktopDisks(vault, checked, keys);
    let remote: RemoteSource | null = null;
    if (opened.disks.some((d) => !d.entry.complete)) {
      if (!opened.state.jobId) throw new CarryonError('wrong-state', 'the check-out has no transfer job; run `carryon checkout` again');
      // QEMU fills what is still arriving by copy-on-read, which aborts over a base with subclusters (layer-template.ts).
      for (const d of opened.disks) {
        if (d.entry.complete || await copyOnReadSafe(d.chain.files.base)) continue;
        throw new CarryonError('wrong-state', `${found.name} is still arriving into a base made by an earlier version (disk ${d.name}, with subclusters), which QEMU cannot fill while the desktop reads it: run \`carryon checkout ${found.name}\` to finish the download first`);
      }
      broker = (await onlineSession(env)).broker;
      const b = broker;
      const jobId = opened.state.jobId;
      const job = await b.call('GET', `/v1/jobs/${jobId}`, undefined, JobView);
      if (!job.transfer) throw new CarryonError('wrong-state', `the transfer job is ${job.state}; run \`carryon checkout\` first`);
      const renew = async () => {
        const j = await b.call('GET', `/v1/jobs/${jobId}`, undefined, JobView);
        if (!j.transfer) throw new CarryonError('job-ended', `job ${jobId} is ${j.state}`);
        return j.transfer;
      };
      // Chunks this laptop holds for clones are read here, under the rules a check-out reads them by (local-sources.ts).
      const incomplete = opened.disks.filter((d) => !d.entry.complete).map((d) => ({ disk: d, dir: diskDir(vault, found.desktopId, d.name) }));
      const local = await siblingReader({ vault, device, password: env.password, state: opened.state, keys, disks: incomplete, log: env.log });
      remote = await RemoteSource.start({ vault, state: opened.state, disks: opened.disks, keys, endpoint: job.transfer, renew, log: env.log, rateLimit: await transferLimiter(env, vault, opened.state), local })
        .catch(async (err: unknown) => {
          await local?.close();
          throw err;
        });
      env.log('check-out still in flight: the desktop reads what it needs first; the rest follows in the background');
    }
    // Bases this session completes were written from chunks authenticated on arrival (as a check-out's are).
    let filledHere = false;
    const checks = new AbortController();
    let checking: Promise<void> = Promise.resolve();
    let saving: Promise<unknown> = Promise.resolve();
    const held: HeldDesktop = {
      vault, state: view(await markLayersOpen(vault, opened.state, keys)), keys, disks: opened.disks, remote,
      async fillIn(host, signal) {
        if (!remote) return;
        try {
          const res = await fillDisks({ host, vault, state: stored(held.state), keys, disks: held.disks, remote, signal, broker, jobId: held.state.jobId });
          held.state = view(res.state);
          filledHere = res.complete;
          if (res.complete && broker) {
            await broker.call('POST', `/v1/checkouts/${held.state.checkoutId}/transferred`, {}, z.object({ checkout: CheckoutView }));
            held.state = { ...held.state, state: 'checked_out', jobId: null };
            await vault.save(stored(held.state), keys);
            env.log(`${held.state.name} is now entirely local: safe to go offline`);
          }
        } catch (err) {
          env.log(`background check-out stopped: ${(err as Error).message}; run \`carryon checkout ${held.state.name}\` to finish it`);
        }
      },
      checkBases(signal, stop) {
        // A base this session fills is held writable by QEMU, whose qcow2 tables may not be on disk
        // yet: reading the file under it would find other bytes (a false "damaged"). Its chunks were
        // authenticated as they arrived; the stamp is recorded once QEMU has closed it (release).
        if (remote || checks.signal.aborted) return Promise.resolve();
        checking = verifyInBackground(vault, keys, () => stored(held.state), (s) => (held.state = view(s)), { signal: AbortSignal.any([signal, checks.signal]), log: env.log, stop });
        return checking;
      },
      async stopChecks() {
        checks.abort();
        await checking;
      },
      updateState(change) {
        const next = saving.then(async () => {
          const s = await change(stored(held.state));
          await vault.save(s, keys);
          held.state = view(s);
          return s;
        });
        saving = next.catch(() => undefined);
        return next;
      },
      async release() {
        await remote?.close();
        await broker?.close();
        await saving;
        // Nothing holds the chain any more: a live replica cut off is settled, and the layers are recorded as they are now.
        try {
          held.state = view(await settleLiveLayers(vault, stored(held.state), keys));
          held.state = view(await recordLayers(vault, stored(held.state), keys, { verifiedBases: filledHere }));
        } finally {
          await release();
        }
      },
    };
    return held;
  } catch (err) {
    await broker?.close();
    await release();
    throw err;
  }
}

export interface ServedDesktop {
  name: string;
  desktopId: string;
  socketPath: string;
  disks: { name: string }[];
  config: Record<string, unknown>;
  /** Resolves when another process asked this one to stop serving (a check-in of the running desktop). */
  stopRequested: Promise<void>;
  close(): Promise<void>;
}

/**
 * Serves a held desktop's disks over NBD on a 0600 unix socket, through qemu-storage-daemon
 * (the same block layer QEMU runs the desktop with), for qemu-img, nbdcopy or another hypervisor.
 */
export async function serveDesktop(env: ClientEnv, desktopRef: string): Promise<ServedDesktop> {
  const held = await holdDesktop(env, desktopRef, 'serve');
  const dir = await socketDir(held.vault, held.state.desktopId);
  let qsd: StorageDaemon | null = null;
  let control: { close(): Promise<void> } | null = null;
  const stopFill = new AbortController();
  let filling: Promise<void> = Promise.resolve();
  try {
    env.log('starting qemu-storage-daemon and opening the encrypted disk chain…');
    qsd = await StorageDaemon.start(dir);
    for (const [i, d] of held.disks.entries()) await addChain(qsd, specFor(d, i, held.remote?.socketPath ?? null), d.chain.secret, d.chain.baseSecret);
    const socketPath = join(dir, 'nbd.sock');
    await qsd.exportNbd(socketPath, held.disks.map((d, i) => ({ node: `${diskPrefix(i)}-top`, name: d.name, writable: true })));
    const host = qsd;
    let requestStop = () => undefined as void;
    const stopRequested = new Promise<void>((r) => (requestStop = r));
    // Other processes take live replicas through the holder (and ask it to stop): src/live/.
    control = await startLiveControl(held, host, {
      kind: 'serve', nbd: { socketPath, ensureServer: async () => undefined }, guestAgent: () => null, log: env.log,
      shutdown: async () => requestStop(), qemuPid: host.pid,
    });
    // The daemon gone on its own (killed, crashed): nothing serves the disk any more; stop, so the chain is settled and recorded.
    let closing = false;
    void host.ended.then((code) => {
      if (closing) return;
      env.log(`qemu-storage-daemon ended unexpectedly (exit ${code}): stopping`);
      requestStop();
    });
    filling = held.fillIn(host, stopFill.signal);
    // After the fill (a base being filled is not checked); a damaged base stops the export.
    const checking = filling.then(() => held.checkBases(stopFill.signal, () => host.qmp.execute('nbd-server-stop').then(() => undefined, () => undefined)));
    filling = checking;
    return {
      name: held.state.name,
      desktopId: held.state.desktopId,
      socketPath,
      disks: held.disks.map((d) => ({ name: d.name })),
      config: { ...held.state.config, ...held.state.localConfig },
      stopRequested,
      close: async () => {
        closing = true;
        await control?.close();
        stopFill.abort();
        await filling;
        await host.stop();
        await held.release();
      },
    };
  } catch (err) {
    await control?.close();
    stopFill.abort();
    await filling;
    await qsd?.stop();
    await held.release();
    throw err;
  }
}
