import { randomBytes } from 'node:crypto';
import { link, mkdir, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { z } from 'zod';
import { CarryonError } from '../../core/errors.js';
import type { LineageKeys } from '../../core/keys.js';
import type { ChainSpec } from '../../disk/chain.js';
import { streamBase, type FillProgress } from '../../disk/fill.js';
import { RemoteCheckpoint } from './remote-checkpoint.js';
import type { BlockHost } from '../../disk/storage-daemon.js';
import { serveNbd, type NbdServer } from '../../nbd/server.js';
import { TransferSession, type Progress, type TransferEndpoint } from '../../transfer-client/client.js';
import type { RateLimiter } from '../../transfer-client/rate-limit.js';
import type { BrokerClient } from '../../net/broker-client.js';
import { diskDir, recordDiskFailure, runDir, socketDir, type DesktopDisk } from '../disks/disks.js';
import type { DesktopKeys } from '../disks/desktop-keys.js';
import { readFilled } from './fill-direct.js';
import type { LocalChunkReader } from './local-copy.js';
import { readJsonFile } from '../../files/json-file.js';
import { dataBytes, LocalProgressReporter, presentBelow } from './local-progress.js';
import type { DesktopRecords, DesktopState } from '../disks/state.js';

/** Node names of disk `i` in whichever QEMU holds the chain. */
export const diskPrefix = (i: number) => `d${i}`;

/** The chain description for disk `i`, with its remote backing while the base is incomplete. */
export function specFor(disk: DesktopDisk, i: number, remoteSocket: string | null, readOnly = false): ChainSpec {
  return {
    files: disk.chain.files,
    secretId: `sec-${diskPrefix(i)}`,
    baseSecretId: disk.chain.baseSecret === undefined ? undefined : `sec-${diskPrefix(i)}-base`,
    // A complete base never changes while the desktop runs: QEMU gets it read-only.
    baseReadOnly: disk.entry.complete,
    prefix: diskPrefix(i),
    remote: !disk.entry.complete && remoteSocket ? { socketPath: remoteSocket, exportName: disk.name } : undefined,
    readOnly,
  };
}

/**
 * The remote checkpoint of every incomplete disk, served to QEMU on a private socket: the backing
 * that lets a desktop boot (and the fill run) before the download ends.
 */
export class RemoteSource {
  private constructor(
    readonly socketPath: string,
    private readonly server: NbdServer,
    private readonly remotes: RemoteCheckpoint[],
    private readonly session: TransferSession,
    private readonly local: LocalChunkReader | null,
  ) {}

  /** `local`: chunks this laptop holds for clones, read before the transfer server is asked (closed with this source). */
  static async start(opts: { vault: DesktopRecords; state: DesktopState; disks: DesktopDisk[]; keys: LineageKeys; endpoint: TransferEndpoint; renew: () => Promise<TransferEndpoint>; log: (l: string) => void; rateLimit?: RateLimiter; local?: LocalChunkReader | null }): Promise<RemoteSource> {
    const session = new TransferSession(opts.endpoint, opts.renew);
    const remotes = new Map<string, RemoteCheckpoint>();
    for (const d of opts.disks) {
      if (d.entry.complete) continue;
      remotes.set(d.name, new RemoteCheckpoint({
        manifest: d.base, keys: opts.keys, session, log: opts.log, rateLimit: opts.rateLimit, local: opts.local,
        onFailure: (m) => void recordDiskFailure(opts.vault, opts.state.desktopId, m),
      }));
    }
    const socketPath = join(await socketDir(opts.vault, opts.state.desktopId), 'remote.sock');
    const server = await serveNbd(new Map([...remotes]), { socketPath });
    return new RemoteSource(socketPath, server, [...remotes.values()], session, opts.local ?? null);
  }

  /** Chunks read from this laptop's copies of clones instead of fetched (each checked against its ID). */
  get copiedChunks(): number {
    return this.local?.copiedChunks ?? 0;
  }

  get copiedBytes(): number {
    return this.local?.copiedBytes ?? 0;
  }

  get fetchedBytes(): number {
    return this.remotes.reduce((s, r) => s + r.fetchedBytes, 0);
  }

  get fetchedChunks(): number {
    return this.remotes.reduce((s, r) => s + r.fetchedChunks, 0);
  }

  async close(): Promise<void> {
    await this.server.close();
    for (const r of this.remotes) await r.close();
    await this.session.close();
    await this.local?.close();
  }
}

/**
 * Streams every incomplete base from its remote backing, recording each completed disk in the
 * vault state as it finishes. Returns the state and whether everything is now local.
 */
export async function fillDisks(opts: {
  host: BlockHost; vault: DesktopRecords; state: DesktopState; keys: DesktopKeys; disks: DesktopDisk[]; remote: RemoteSource;
  signal?: AbortSignal; onProgress?: (p: Progress) => void;
  /** Where the laptop's count goes besides `fill.json` (the broker's admin views). */
  broker?: BrokerClient | null; jobId?: string | null;
}): Promise<{ state: DesktopState; complete: boolean }> {
  let state = opts.state;
  const totals = new Map<number, FillProgress>();
  const started = Date.now();
  // The percentage is of the desktop's data (holes not counted), as for a check-out: QEMU's offsets
  // become the data bytes present below them, plus what was already there when the fill began.
  const reporter = new LocalProgressReporter({ vault: opts.vault, desktopId: opts.state.desktopId, broker: opts.broker, jobId: opts.jobId });
  const bytesTotal = opts.disks.reduce((n, d) => n + dataBytes(d.base), 0);
  const present = await Promise.all(opts.disks.map(async (d): Promise<(offset: number) => number> => {
    if (!d.entry.complete) return presentBelow(d.base, await readFilled(diskDir(opts.vault, opts.state.desktopId, d.name)));
    const all = dataBytes(d.base);
    return () => all;
  }));
  const report = (i: number, p: FillProgress) => {
    totals.set(i, p);
    let done = 0;
    let total = 0;
    for (const t of totals.values()) {
      done += t.done;
      total += t.total;
    }
    const bytesLocal = present.reduce((n, at, d) => n + at(totals.get(d)?.done ?? 0), 0);
    const secs = (Date.now() - started) / 1000;
    const rate = secs > 0 ? opts.remote.fetchedBytes / secs : 0;
    const chunk = opts.disks[0]?.base.chunkSize ?? 1;
    opts.onProgress?.({ bytesDone: opts.remote.fetchedBytes, chunksDone: Math.floor(done / chunk), chunksTotal: Math.ceil(total / chunk), rate, etaSeconds: done > 0 && secs > 0 ? ((total - done) / done) * secs : null, bytesLocal, bytesTotal, chunksCopied: opts.remote.copiedChunks });
    // Chunks read from the laptop's own copies are counted as present like fetched ones (QEMU's offset passed them), and said apart.
    reporter.setCounts({ copiedChunks: opts.remote.copiedChunks, copiedBytes: opts.remote.copiedBytes, fetchedChunks: opts.remote.fetchedChunks });
    reporter.update(bytesLocal, bytesTotal, opts.remote.fetchedBytes);
  };
  const results = await Promise.all(
    opts.disks.map(async (d, i) => {
      if (d.entry.complete) return true;
      const how = await streamBase(opts.host, diskPrefix(i), { signal: opts.signal, onProgress: (p) => report(i, p) });
      if (how !== 'complete') return false;
      state = { ...state, disks: state.disks.map((x) => (x.name === d.name ? { ...x, complete: true } : x)) };
      await opts.vault.save(state, opts.keys);
      return true;
    }),
  );
  // The last count, whatever the once-a-second pace skipped: what was copied here and fetched, in full.
  reporter.setCounts({ copiedChunks: opts.remote.copiedChunks, copiedBytes: opts.remote.copiedBytes, fetchedChunks: opts.remote.fetchedChunks });
  if (results.every(Boolean)) reporter.update(bytesTotal, bytesTotal, opts.remote.fetchedBytes, true);
  await reporter.settle();
  return { state, complete: results.every(Boolean) };
}

/** `background`: the agent's scheduled replica (client/background.ts), which gives way to anyone else. */
const Owner = z.object({ pid: z.number().int(), kind: z.enum(['checkout', 'checkin', 'replicate', 'serve', 'run']), background: z.boolean().optional() });
export type OwnerKind = z.infer<typeof Owner>['kind'];

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

/**
 * Signals `pid` and waits up to 30 s for it to end; `killAfterMs`: SIGKILL once that has passed (a
 * background replica at the idle CPU class may wait long for CPU; killed, it is safe: its push is
 * journaled and a merge after its commit resumes at the chain's next open).
 */
async function stopAndWait(pid: number, signal: NodeJS.Signals, what: string, opts: { killAfterMs?: number } = {}): Promise<void> {
  try {
    process.kill(pid, signal);
  } catch {
    return; // gone already
  }
  const started = Date.now();
  let killed = false;
  for (let i = 0; i < 300 && alive(pid); i++) {
    if (!killed && opts.killAfterMs !== undefined && Date.now() - started >= opts.killAfterMs) {
      killed = true;
      try {
        process.kill(pid, 'SIGKILL');
      } catch {
        // ended meanwhile
      }
    }
    await new Promise((r) => setTimeout(r, 100));
  }
  if (alive(pid)) throw new CarryonError('disk-busy', `${what} (pid ${pid}) did not stop within 30 s: run the same command again in a minute`);
}

/** The live process holding the desktop's disk, if any. */
export async function readOwner(vault: DesktopRecords, desktopId: string): Promise<z.infer<typeof Owner> | null> {
  // A claim appears whole (claimOwner), so a damaged one was not written by a live owner: stale, like a dead pid.
  const owner = await readJsonFile(join(runDir(vault, desktopId), 'owner.json'), Owner, { missing: null, damaged: null });
  return owner && owner.pid !== process.pid && alive(owner.pid) ? owner : null;
}

/** What to do about a desktop another command holds, in the words of the command that was refused. */
function busyAdvice(wanted: OwnerKind, holder: OwnerKind): string {
  const running = holder === 'run' || holder === 'serve';
  // A check-in of a running desktop goes live (checkin.ts); what claims as a check-in here is a rollback.
  if (running && wanted === 'checkin') return ` (shut the desktop down first; its writes since the last replica would be discarded: \`carryon replicate\` keeps them as a restore point)`;
  return '';
}

/**
 * Claims the desktop's chain for this process. A running check-out is asked to pause (its
 * download continues inside the new owner); any other live owner is a clear refusal. QEMU's own
 * image locks remain the last word.
 */
export async function claimOwner(vault: DesktopRecords, desktopId: string, kind: OwnerKind, log: (l: string) => void, opts: { background?: boolean } = {}): Promise<() => Promise<void>> {
  const file = join(runDir(vault, desktopId), 'owner.json');
  await mkdir(runDir(vault, desktopId), { recursive: true, mode: 0o700 });
  // The claim is written aside first and linked into place: the link is the exclusive create (of two
  // processes starting at once, exactly one becomes the owner), and no one ever reads a half-written claim.
  const mine = `${file}.${process.pid}-${randomBytes(6).toString('hex')}`;
  await writeFile(mine, JSON.stringify({ pid: process.pid, kind, ...(opts.background ? { background: true } : {}) }), { mode: 0o600 });
  try {
    for (let attempt = 0; attempt < 5; attempt++) {
      try {
        await link(mine, file);
        return async () => {
          await rm(file, { force: true });
        };
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
      }
      const current = await readOwner(vault, desktopId);
      if (current?.background && !opts.background) {
        // The agent's replica gives way to the user (as a running desktop's does, live/control.ts):
        // stopped, it sends nothing more and its changes go with the next replica or this command.
        log(`stopping the agent's background replica (pid ${current.pid}); its changes go with the next one`);
        await stopAndWait(current.pid, 'SIGTERM', 'the background replica', { killAfterMs: 10_000 });
      } else if (current) {
        if (current.kind !== 'checkout' || (kind !== 'run' && kind !== 'serve')) {
          throw new CarryonError('disk-busy', `the desktop is in use by \`carryon ${current.kind}\` (pid ${current.pid}): stop it first${busyAdvice(kind, current.kind)}`);
        }
        log(`pausing the running check-out (pid ${current.pid}); the download continues here`);
        await stopAndWait(current.pid, 'SIGINT', 'the check-out');
      }
      // The owner is gone (finished, or killed with -9): its claim is stale.
      await rm(file, { force: true });
    }
    throw new CarryonError('disk-busy', 'another carryon process keeps claiming this desktop');
  } finally {
    await rm(mine, { force: true });
  }
}

/** A desktop whose chains this process holds (for `serve` or `run`), with the fill if still in flight. */
export interface HeldDesktop {
  vault: DesktopRecords;
  state: DesktopState;
  keys: DesktopKeys;
  disks: DesktopDisk[];
  remote: RemoteSource | null;
  /** Starts filling the incomplete bases in `host`; resolves when done (or stopped), never rejects. */
  fillIn(host: BlockHost, signal?: AbortSignal): Promise<void>;
  /**
   * Checks the complete bases against their checkpoint in the background (layer-guard.ts); on a
   * mismatch `stop` ends the disk's use, then the desktop is marked damaged. Never rejects.
   */
  checkBases(signal: AbortSignal, stop: () => Promise<void>): Promise<void>;
  /** Ends the background check of the bases (a live replica's fold is about to write one) and waits for it. */
  stopChecks(): Promise<void>;
  /** Changes the desktop's record (as stored: the MACed config, not the view) and saves it; one change at a time. */
  updateState(change: (stored: DesktopState) => DesktopState | Promise<DesktopState>): Promise<DesktopState>;
  release(): Promise<void>;
}
