import { readFileSync } from 'node:fs';
import { hostname } from 'node:os';
import type { Command } from 'commander';
import { CarryonError } from '../core/errors.js';

const int = (name: string) => (v: string) => {
  const n = Number(v);
  if (!Number.isInteger(n) || n < 0) throw new CarryonError('invalid', `${name} must be a non-negative integer, got ${v}`);
  return n;
};

export function registerTransferCommands(program: Command): void {
  program
    .command('transfer-server')
    .description('run a transfer server on its own host and register it with the broker')
    .requiredOption('--broker <url>', 'broker URL')
    .requiredOption('--broker-fingerprint <sha256>', 'pinned broker certificate fingerprint')
    .requiredOption('--secret-file <file>', "the broker's transfer.secret")
    .requiredOption('--master-key-file <file>', "the broker's master.key (datacenter side only)")
    .requiredOption('--store <dir|url>', "the chunk store shared with the broker: its directory, or the broker's s3://… URL plus index=<the pack index the broker uses>")
    .option('--id <id>', 'server id', hostname())
    .option('--slots <n>', 'transfer slots', int('--slots'), 4)
    .option('--host <addr>', 'listen address', '127.0.0.1')
    .option('--public-host <name>', 'host name clients use to reach this server')
    .option('--port <n>', 'listen port', int('--port'), 9443)
    .option('--tls-dir <dir>', 'where its certificate lives (self-signed at first start)', './transfer-tls')
    .option('--heartbeat-sec <n>', 'seconds between heartbeats (slots, byte counters) to the broker', int('--heartbeat-sec'), 5)
    .action(async (o: { broker: string; brokerFingerprint: string; secretFile: string; masterKeyFile: string; store: string; id: string; slots: number; host: string; publicHost?: string; port: number; tlsDir: string; heartbeatSec: number }) => {
      if (o.slots < 1) throw new CarryonError('invalid', '--slots must be at least 1');
      if (o.heartbeatSec < 1) throw new CarryonError('invalid', '--heartbeat-sec must be at least 1');
      const { startStandaloneTransfer } = await import('../transfer/standalone.js'); // lazily: see server-commands.ts
      const server = await startStandaloneTransfer({
        id: o.id, brokerUrl: o.broker.replace(/\/$/, ''), brokerFingerprint: o.brokerFingerprint, secret: readFileSync(o.secretFile, 'utf8').trim(),
        slots: o.slots, storeDir: o.store, masterKeyFile: o.masterKeyFile, host: o.host, publicHost: o.publicHost, port: o.port, tlsDir: o.tlsDir, heartbeatSec: o.heartbeatSec,
      });
      process.stdout.write(`transfer server ${o.id} on ${server.url} (${o.slots} slots), certificate ${server.fingerprint}, registered with ${o.broker}\n`);
      await new Promise<void>((resolve) => {
        process.once('SIGINT', resolve);
        process.once('SIGTERM', resolve);
      });
      await server.close();
    });
}
