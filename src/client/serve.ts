import { join } from 'node:path';
import { CarryonError } from '../core/errors.js';
import { serveNbd, type NbdServer } from '../nbd/server.js';
import { fetchOne, TransferSession } from '../transfer/client.js';
import { JobView } from './broker-client.js';
import { loadDevice } from './home.js';
import { onlineSession, type ClientEnv } from './ops.js';
import { Vault } from './vault.js';
import type { VaultDisk } from '../disk/vault-disk.js';

export interface ServedDesktop {
  name: string;
  desktopId: string;
  socketPath: string;
  disks: { name: string; disk: VaultDisk }[];
  config: Record<string, unknown>;
  close(): Promise<void>;
}

/**
 * Serves a held desktop's disks over NBD on a 0600 unix socket. While the check-out is still
 * transferring, a read of a chunk not yet local fetches it at once (boot while data is in flight).
 */
export async function serveDesktop(env: ClientEnv, desktopRef: string): Promise<ServedDesktop> {
  const device = await loadDevice(env.home);
  const vault = await Vault.open(env.home);
  const state = await vault.find(desktopRef);
  const { keys } = await vault.unlock(device, await env.password(), state);
  let session: TransferSession | null = null;
  let fetchChunk: ((id: string) => Promise<void>) | undefined;
  if (state.state === 'transferring') {
    if (!state.jobId) throw new CarryonError('wrong-state', 'check-out has no transfer job');
    const { broker } = await onlineSession(env);
    const job = await broker.call('GET', `/v1/jobs/${state.jobId}`, undefined, JobView);
    if (!job.transfer) throw new CarryonError('wrong-state', `transfer job is ${job.state}; run \`carryon checkout\` first`);
    const jobId = job.id;
    session = new TransferSession(job.transfer, async () => {
      const j = await broker.call('GET', `/v1/jobs/${jobId}`, undefined, JobView);
      if (!j.transfer) throw new CarryonError('job-ended', `job ${jobId} is ${j.state}`);
      return j.transfer;
    });
    const s = session;
    fetchChunk = (id) => fetchOne(s, id, keys, vault.store);
    env.log('check-out still in flight: missing chunks are fetched on demand');
  }
  const disks = await vault.openDisks(state, keys, fetchChunk);
  const socketPath = join(vault.desktopDir(state.desktopId), 'run', 'nbd.sock');
  let server: NbdServer;
  try {
    server = await serveNbd(new Map(disks.map((d) => [d.name, d.disk])), { socketPath });
  } catch (err) {
    for (const d of disks) await d.disk.close();
    throw err;
  }
  return {
    name: state.name,
    desktopId: state.desktopId,
    socketPath,
    disks,
    config: { ...state.config, ...state.localConfig },
    close: async () => {
      await server.close();
      for (const d of disks) await d.disk.close();
      await session?.close();
      await vault.store.close();
    },
  };
}
