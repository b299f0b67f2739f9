import { createPublicKey, randomBytes, type KeyObject } from 'node:crypto';
import { existsSync } from 'node:fs';
import { mkdir, readdir, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { z } from 'zod';
import { decodeManifest, encodedDigest, type Manifest } from '../../core/chunks/manifest.js';
import { CarryonError } from '../../core/errors.js';
import { decodeLineageKeys, deriveDiskSecret } from '../../core/keys.js';
import { chainFiles, createLayer, eraseChainKeys, layerSecret, type Chain } from '../../disk/chain.js';
import { Qcow2BaseWriter } from '../../disk/qcow2/qcow2-base-writer.js';
import { unmapChunksExcept } from '../../disk/qcow2/qcow2-unmap.js';
import { writeFileAtomic } from '../../files/atomic.js';
import { newDesktopKeys, type DesktopKeys } from '../../live/disks/desktop-keys.js';
import { chainOf, diskDir, templatesDir } from '../../live/disks/disks.js';
import { fillDirect, readFilled, writeFilled, type BaseSink } from '../../live/fill/fill-direct.js';
import { claimOwner } from '../../live/fill/holder.js';
import { CheckoutView, JobView, type BrokerClient } from '../../net/broker-client.js';
import { TransferSession } from '../../transfer-client/client.js';
import { boundedLimiter } from '../../transfer-client/rate-limit.js';
import type { DeviceIdentity } from '../vault/home.js';
import { Vault, type DesktopState } from '../vault/vault.js';
import { activeJob, renewer, type ClientEnv } from './session.js';

/**
 * The laptop's side of a handover (a check-out of a desktop that runs on a datacenter host): it
 * follows the steps with a long poll, and meanwhile fetches the snapshot the host ran from into
 * the base the check-out will keep. After the commit only the chunks the guest changed travel.
 *
 * What is fetched early is never a checkpoint: until the broker answers the check-out (201) the
 * desktop's folder holds `prefetch.json` and the base, and no `state.json`, so nothing lists,
 * runs or serves it; its LUKS secret derives from a vault key that is only in this process
 * (a kill leaves ciphertext nobody can open, erased by the next check-out). At the commit every
 * chunk whose ID differs from the checkpoint's is dropped from `filled.json`, then unmapped, and
 * only then is the state saved (naming the checkpoint): a kill in between leaves no state, and the
 * rerun starts over. Cancelled or failed: erased (LUKS header first).
 */

const HandoverView = z.object({ host: z.string(), step: z.string(), detail: z.string().nullable() }).loose();
const PrefetchView = z.object({
  snapshotId: z.string(), maxTransferRateKBps: z.number(), job: JobView, keys: z.string(),
  disks: z.array(z.object({ name: z.string(), digest: z.string(), manifest: z.string() })),
});
export type PrefetchView = z.infer<typeof PrefetchView>;
export const HandoverWait = z.object({ checkout: CheckoutView, handover: HandoverView, prefetch: PrefetchView.optional() });

const MARKER = 'prefetch.json';
/** Each long poll waits at most this long on the broker (which bounds it at 25 s too). */
const WAIT_MS = 25_000;

/**
 * Follows the handover until the checkpoint is there (each step logged as it comes); a handover
 * that failed, or a check-out that ended meanwhile, says why. Interrupted, the same command picks
 * it up again (the broker answers the same check-out).
 */
export async function waitForHandover(env: ClientEnv, broker: BrokerClient, name: string, checkoutId: string, known: string): Promise<void> {
  let said = '';
  let after = known;
  for (;;) {
    if (env.signal?.aborted) throw new CarryonError('aborted', 'stopped waiting for the host; run the same command again to go on');
    const asked = broker.call('GET', `/v1/checkouts/${checkoutId}/handover?after=${encodeURIComponent(after)}&waitMs=${WAIT_MS}`, undefined, HandoverWait);
    const { handover: h, checkout: c } = await untilAborted(asked, env.signal);
    const line = h.step === 'asked' ? `${name} runs on host ${h.host}: asking it to hand the desktop over`
      : h.step === 'shutting-down' ? `host ${h.host} is shutting ${name} down` : h.step === 'sending' ? `host ${h.host} is sending back what ${name} wrote (${h.detail ?? ''})` : `handover ${h.step}`;
    if (line !== said) env.log((said = line));
    if (h.step === 'done') return;
    if (h.step === 'failed' || h.step === 'cancelled' || c.state !== 'transferring') {
      const why = c.state !== 'transferring' ? `the check-out is ${c.state}` : `${h.step}: ${h.detail ?? 'no reason'}`;
      throw new CarryonError('handover-failed', `host ${h.host} did not hand ${name} over (${why}); the desktop stays on the host, nothing is lost`);
    }
    after = h.step;
  }
}

/** The call's answer, or 'aborted' as soon as the signal says so (the long poll is left to end on its own). */
function untilAborted<T>(p: Promise<T>, signal?: AbortSignal): Promise<T> {
  if (!signal) return p;
  return new Promise<T>((resolve, reject) => {
    const onAbort = () => reject(new CarryonError('aborted', 'stopped waiting for the host; run the same command again to go on'));
    signal.addEventListener('abort', onAbort, { once: true });
    p.then(resolve, reject).finally(() => signal.removeEventListener('abort', onAbort));
  });
}

interface Prepared { keys: DesktopKeys; wrapped: DesktopState['keys']; disks: { name: string; digest: string; manifest: Manifest; chain: Chain }[] }

/** What the early fetch left for the check-out: chunks kept (their IDs equal the checkpoint's) and dropped. */
export interface Adopted { keys: DesktopKeys; wrapped: DesktopState['keys']; keptChunks: number; droppedChunks: number; prefetchedChunks: number }

/**
 * The early fetch of the snapshot the host ran from, begun with the broker's 202 and running in
 * the background while the laptop waits on the steps. `adopt` (after the commit) stops it and
 * keeps what matches the checkpoint; `discard` (cancel, failure) erases it.
 */
export class HandoverPrefetch {
  private readonly stop = new AbortController();
  private prepared: Prepared | null = null;
  private release: (() => Promise<void>) | null = null;
  private readonly running: Promise<void>;
  /** When the whole snapshot was here (ms since the start), or null. */
  completeAfterMs: number | null = null;
  private readonly startedAt = Date.now();

  constructor(private readonly o: { env: ClientEnv; vault: Vault; broker: BrokerClient; device: DeviceIdentity; brokerKey: KeyObject; desktopId: string; checkoutId: string; view: PrefetchView }) {
    this.running = this.run().catch((err: unknown) => {
      // The ticket ends at the commit: a fetch cut off there (or failing) only costs what it did not fetch.
      if (!this.stop.signal.aborted) o.env.log(`fetching ahead stopped: ${(err as Error).message}`);
    });
  }

  private async run(): Promise<void> {
    const { env, vault, desktopId, view } = this.o;
    this.release = await claimOwner(vault, desktopId, 'checkout', env.log);
    await discardLeftover(vault, desktopId);
    const keys = newDesktopKeys(decodeLineageKeys(view.keys), this.o.brokerKey, createPublicKey(this.o.device.privateKey));
    // The vault's wrap (scrypt, on libuv's pool) is made meanwhile, off the check-out's critical path; the layers' secrets need only its salt.
    const salt = randomBytes(16);
    const wrapping = Vault.wrapKeys(this.o.device, await env.password(), keys, desktopId, salt);
    wrapping.catch(() => undefined); // awaited below; never unhandled meanwhile
    const dir = vault.desktopDir(desktopId);
    await mkdir(dir, { recursive: true, mode: 0o700 });
    await writeFileAtomic(join(dir, MARKER), JSON.stringify({ v: 1, checkoutId: this.o.checkoutId, snapshotId: view.snapshotId, disks: view.disks.map((d) => ({ name: d.name, digest: d.digest })) }));
    const disks: Prepared['disks'] = [];
    for (const d of view.disks) {
      const raw = Buffer.from(d.manifest, 'base64');
      if (encodedDigest(raw) !== d.digest) throw new CarryonError('bad-manifest', `manifest of ${d.name} does not match its digest`);
      const manifest = decodeManifest(raw);
      await vault.putManifest(desktopId, manifest);
      // The chain the check-out's state will name (per-layer secrets, top.qcow2): checked again at adoption.
      const chain: Chain = { files: chainFiles(diskDir(vault, desktopId, d.name)), secret: deriveDiskSecret(keys, desktopId, d.name, salt, 'top'), baseSecret: deriveDiskSecret(keys, desktopId, d.name, salt, 'base') };
      await mkdir(diskDir(vault, desktopId, d.name), { recursive: true, mode: 0o700 });
      await createLayer(chain, 'base', manifest.diskSize, manifest.chunkSize, templatesDir(vault.home));
      disks.push({ name: d.name, digest: d.digest, manifest, chain });
    }
    if (this.stop.signal.aborted) return void (this.prepared = { keys, wrapped: await wrapping, disks });
    const job = await activeJob({ ...env, signal: this.stop.signal }, this.o.broker, view.job);
    const session = new TransferSession(job.transfer!, renewer(this.o.broker, job.id));
    const sinks: BaseSink[] = [];
    try {
      for (const d of disks) sinks.push(await Qcow2BaseWriter.open(d.chain.files.base, layerSecret(d.chain, 'base'), d.manifest.chunkSize));
      const bound = view.maxTransferRateKBps > 0 ? view.maxTransferRateKBps * 1024 : undefined;
      await fillDirect({
        disks: disks.map((d, i) => ({ disk: { base: d.manifest }, dir: diskDir(vault, desktopId, d.name), sink: sinks[i]! })),
        session, keys, signal: this.stop.signal, rateLimit: boundedLimiter(env.rateLimit, bound),
      });
      this.completeAfterMs = Date.now() - this.startedAt;
      env.log(`fetched snapshot ${view.snapshotId} ahead while the host handed the desktop over (${(this.completeAfterMs / 1000).toFixed(2)} s)`);
    } finally {
      await Promise.all(sinks.map((s) => s.close()));
      await session.close();
      // Usable only with its wrap: a failed scrypt leaves nothing prepared (the check-out then starts fresh).
      this.prepared = { keys, wrapped: await wrapping, disks };
    }
  }

  /**
   * After the commit (`disks`: the checkpoint's, their manifests already in the vault): stops the
   * fetch, keeps each chunk whose ID is the checkpoint's at that index, unmaps every other one.
   * Null when nothing fits (other disks, shape or keys): then it was erased and the fill starts fresh.
   */
  async adopt(lineageKeys: string, disks: { name: string; digest: string; manifest: Manifest }[], state: (wrapped: DesktopState['keys']) => DesktopState): Promise<Adopted | null> {
    this.stop.abort();
    await this.running;
    const p = this.prepared;
    const fits = p && lineageKeys === this.o.view.keys && disks.length === p.disks.length && disks.every((d) => {
      const old = p.disks.find((x) => x.name === d.name);
      return old && old.manifest.diskSize === d.manifest.diskSize && old.manifest.chunkSize === d.manifest.chunkSize;
    });
    if (!p || !fits) {
      await this.discard({ keepManifests: true });
      return null;
    }
    // The chain the state will name must be the one filled (same files, same secret).
    const s = state(p.wrapped);
    let kept = 0;
    let dropped = 0;
    let prefetched = 0;
    for (const d of disks) {
      const old = p.disks.find((x) => x.name === d.name)!;
      const chain = chainOf(this.o.vault, s, p.keys, d.name);
      if (chain.files.base !== old.chain.files.base || layerSecret(chain, 'base') !== layerSecret(old.chain, 'base')) {
        await this.discard({ keepManifests: true });
        return null;
      }
      const dir = diskDir(this.o.vault, this.o.desktopId, d.name);
      const filled = await readFilled(dir);
      const keep = new Set([...filled].filter((i) => d.manifest.chunks[i] !== null && d.manifest.chunks[i] === old.manifest.chunks[i]));
      // Shrunk first (a chunk not listed is only fetched again), then the stale clusters go: none reads as the old snapshot's.
      await writeFilled(dir, keep);
      await unmapChunksExcept(old.chain.files.base, d.manifest.chunkSize, keep);
      kept += keep.size;
      dropped += filled.size - keep.size;
      prefetched += filled.size;
    }
    return { keys: p.keys, wrapped: p.wrapped, keptChunks: kept, droppedChunks: dropped, prefetchedChunks: prefetched };
  }

  /** The state naming the checkpoint is saved: the marker goes, and the desktop is the check-out's own (its claim too). */
  async adopted(): Promise<void> {
    await rm(join(this.o.vault.desktopDir(this.o.desktopId), MARKER), { force: true });
    await this.release?.();
    this.release = null;
  }

  /** Cancelled, failed or not usable: erased (LUKS headers first, then the files). */
  async discard(opts: { keepManifests?: boolean } = {}): Promise<void> {
    this.stop.abort();
    await this.running;
    // Only what this run made (another process holding the desktop keeps its own).
    if (this.release) await discardLeftover(this.o.vault, this.o.desktopId, opts);
    await this.release?.();
    this.release = null;
  }
}

/**
 * What an early fetch left in a desktop's folder that has no state (a kill, a cancel): its bases'
 * LUKS headers erased, then its disks, marker and manifests removed. A folder with a state is the
 * check-out's own and is never touched.
 */
export async function discardLeftover(vault: Vault, desktopId: string, opts: { keepManifests?: boolean } = {}): Promise<void> {
  const dir = vault.desktopDir(desktopId);
  if (existsSync(join(dir, 'state.json'))) return;
  const disks = await readdir(join(dir, 'disks')).catch(() => [] as string[]);
  await Promise.all(disks.map((d) => eraseChainKeys(join(dir, 'disks', d))));
  // `keepManifests`: a check-out that has just put the checkpoint's (they name chunks, hold no data).
  await Promise.all([rm(join(dir, 'disks'), { recursive: true, force: true }), rm(join(dir, MARKER), { force: true }), opts.keepManifests ? null : rm(join(dir, 'manifests'), { recursive: true, force: true })]);
}
