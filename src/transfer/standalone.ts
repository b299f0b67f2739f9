import { readFile } from 'node:fs/promises';
import { z } from 'zod';
import { BrokerClient } from '../net/broker-client.js';
import { CarryonError } from '../core/errors.js';
import { publicKeyFromBase64 } from '../core/signing.js';
import { openChunkStore } from '../store/open-store.js';
import { startTransferServer, type TransferServer } from './server.js';

export interface StandaloneOptions {
  id: string;
  brokerUrl: string;
  brokerFingerprint: string;
  secret: string;
  slots: number;
  /** The chunk store shared with the broker (same directory, e.g. over NFS). */
  storeDir: string;
  masterKeyFile: string;
  host?: string;
  /** Address clients use to reach this server, when it differs from host:port. */
  publicHost?: string;
  port?: number;
  tlsDir: string;
  heartbeatSec?: number;
}

/** A transfer server on its own host: registers with the broker, then heartbeats. */
export async function startStandaloneTransfer(o: StandaloneOptions): Promise<TransferServer & { heartbeat(): Promise<void> }> {
  const masterKey = await readFile(o.masterKeyFile);
  if (masterKey.length !== 32) throw new CarryonError('bad-config', `${o.masterKeyFile} must hold the broker's 32-byte master key`);
  const broker = new BrokerClient(o.brokerUrl, o.brokerFingerprint);
  const headers = { 'x-carryon-transfer-secret': o.secret };
  const store = await openChunkStore(o.storeDir);
  // The broker's signing key is learned once, over the pinned connection, before serving anything.
  const info = await broker.call('GET', '/v1/broker', undefined, z.object({ signingPublicKey: z.string() }));
  const server = await startTransferServer({ id: o.id, host: o.host, port: o.port, slots: o.slots, store, masterKey, brokerPublicKey: publicKeyFromBase64(info.signingPublicKey), tlsDir: o.tlsDir });
  const url = o.publicHost ? server.url.replace(/\/\/[^:/]+/, `//${o.publicHost}`) : server.url;
  const register = () => broker.call('POST', '/v1/transfer-servers/register', { id: o.id, url, slots: o.slots, fingerprint: server.fingerprint }, z.object({ signingPublicKey: z.string() }), headers);
  await register();
  // Each heartbeat carries the per-job access summaries (the broker audits them) and brings back
  // the revocation list: jobs ended or cut off, whose tickets must stop working before they expire.
  let unsent: ReturnType<TransferServer['drainSummaries']> = [];
  const heartbeat = async () => {
    const evicted = [...unsent, ...server.drainSummaries()].slice(-10_000);
    unsent = evicted;
    // `jobs`: live per-job progress (admin views); `evicted`: final per-job summaries (audit).
    const jobs = [...server.stats.perJob].slice(-1000).map(([id, c]) => ({ id, ...c }));
    const reply = await broker.call('POST', `/v1/transfer-servers/${encodeURIComponent(o.id)}/heartbeat`, { activeStreams: 0, bytesIn: server.stats.bytesIn, bytesOut: server.stats.bytesOut, jobs, evicted },
      z.object({ ok: z.boolean(), revokedJobs: z.array(z.string()).optional() }), headers);
    unsent = [];
    server.setRevoked(reply.revokedJobs ?? []);
  };
  await heartbeat();
  const beat = setInterval(() => {
    heartbeat().catch(() => register().catch(() => undefined)); // the broker forgot us (restart): register again
  }, (o.heartbeatSec ?? 5) * 1000);
  beat.unref();
  return {
    ...server,
    heartbeat,
    close: async () => {
      clearInterval(beat);
      await server.close();
      await broker.close();
      await store.close();
    },
  };
}
