import { readFileSync } from 'node:fs';
import { resolve } from 'node:path';
import type { Command } from 'commander';
import { CarryonError } from '../core/errors.js';
import { probeKvm } from '../hypervisor/host.js';

const int = (name: string, min: number) => (v: string) => {
  const n = Number(v);
  if (!Number.isInteger(n) || n < min) throw new CarryonError('invalid', `${name} must be an integer of at least ${min}, got ${v}`);
  return n;
};

interface HostCliOptions {
  broker: string; brokerFingerprint: string; secretFile: string; dataDir: string; id?: string; vcpus: number; ramMib: number; maxDesktops: number;
  accel: string; heartbeatSec: number; shutdownGraceSec: number; pausedGuests?: boolean; replicateSec?: number;
}

export function registerHostCommands(program: Command): void {
  program
    .command('host')
    .description('run desktops online on this machine for a broker (registers, heartbeats, polls for commands; the broker never connects to it)')
    .requiredOption('--broker <url>', 'broker URL')
    .requiredOption('--broker-fingerprint <sha256>', 'pinned broker certificate fingerprint')
    .requiredOption('--secret-file <file>', "this host's own credential (`carryon admin hosts add ID` on the broker's side makes it)")
    .requiredOption('--data-dir <dir>', "where the desktops' encrypted chains and this host's key live")
    .requiredOption('--vcpus <n>', 'vCPUs offered to desktops', int('--vcpus', 1))
    .requiredOption('--ram-mib <n>', 'RAM offered to desktops, MiB', int('--ram-mib', 64))
    .requiredOption('--max-desktops <n>', 'desktops run at once at most', int('--max-desktops', 1))
    .option('--id <id>', 'host id (default: the one the credential names; another is refused)')
    .option('--accel <kvm|tcg|auto>', 'auto: KVM where a probe shows it runs a guest, else TCG', 'auto')
    .option('--heartbeat-sec <n>', 'seconds between heartbeats (and command polls)', int('--heartbeat-sec', 1), 5)
    .option('--shutdown-grace-sec <n>', 'how long an ACPI shutdown may take before the guest is powered off', int('--shutdown-grace-sec', 1), 60)
    .option('--replicate-sec <n>', "seconds between background replicas of each running desktop, instead of its policy's replicationIntervalMin (0: none)", int('--replicate-sec', 0))
    .option('--paused-guests', 'start guests with their CPUs stopped (testing)')
    .action(async (o: HostCliOptions) => {
      if (!['kvm', 'tcg', 'auto'].includes(o.accel)) throw new CarryonError('invalid', `--accel must be kvm, tcg or auto, got ${o.accel}`);
      let accel = o.accel as 'kvm' | 'tcg' | 'auto';
      if (accel !== 'tcg') {
        const probe = await probeKvm();
        if (!probe.ok && accel === 'kvm') throw new CarryonError('no-kvm', `--accel kvm, but KVM does not run a guest here: ${probe.why ?? 'unknown'}`);
        if (!probe.ok) process.stderr.write(`carryon host: KVM not usable (${probe.why ?? 'unknown'}): guests run under TCG\n`);
        accel = probe.ok ? 'kvm' : 'tcg';
      }
      const secret = readFileSync(o.secretFile, 'utf8').trim();
      const { startHost, credentialHostId } = await import('../host/service.js'); // lazily: see server-commands.ts
      const id = credentialHostId(secret, o.id);
      const host = await startHost({
        id, brokerUrl: o.broker.replace(/\/$/, ''), brokerFingerprint: o.brokerFingerprint, secret, dataDir: resolve(o.dataDir),
        vcpus: o.vcpus, ramMiB: o.ramMib, maxDesktops: o.maxDesktops, accel, heartbeatSec: o.heartbeatSec, shutdownGraceSec: o.shutdownGraceSec, pausedGuests: Boolean(o.pausedGuests), replicateSec: o.replicateSec,
        log: (line) => void process.stderr.write(`carryon host: ${line}\n`),
      });
      process.stdout.write(`desktop host ${host.id} registered with ${o.broker}: ${o.vcpus} vCPUs, ${o.ramMib} MiB, up to ${o.maxDesktops} desktops, ${accel}\n`);
      await new Promise<void>((done) => {
        process.once('SIGINT', done);
        process.once('SIGTERM', done);
      });
      await host.close();
    });
}
