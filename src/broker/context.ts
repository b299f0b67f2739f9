import type { DatacenterHypervisor } from '../hypervisor/datacenter/hypervisor.js';
import type { ChunkStore } from '../store/chunk-store.js';
import type { MetadataStore } from './db/metadata.js';
import type { LdapConfig } from './auth/directory.js';
import type { KeyObject } from 'node:crypto';
import type { GatewaySettings } from './gateway/routes.js';
import type { HostStore } from './hosts/store.js';
import type { ReleaseStore } from './releases/store.js';
import type { BrokerSecrets } from './secrets.js';
import type { JobProgress } from './transfers/progress.js';
import type { Scheduler } from './transfers/scheduler.js';
import type { LoginThrottle } from './auth/throttle.js';

export interface BrokerSettings {
  /** Session token lifetime. */
  sessionTtlSec: number;
  /** RAM kept back for the laptop's hypervisor and host OS. */
  hypervisorOverheadMiB: number;
  /** scrypt cost for new password hashes (tests lower it). */
  passwordCostN: number;
  ldap?: LdapConfig;
  /**
   * Directories admins may import images from (resolved, symlinks followed); none: imports by
   * path are refused. `carryon server --import-dir`.
   */
  importDirs: string[];
  /** With requireOnlineReauth, check-in / replicate / rollback need a password login this recent. */
  reauthWindowSec: number;
  /** Shared secret transfer servers present when they register. */
  transferSecret: string;
  /** The public gateway laptops are given (`--gateway`, `--gateway-domain`); absent: servers' own URLs. */
  gateway?: GatewaySettings;
}

export interface AuditEntry {
  actor: string;
  desktopId?: string | null;
  action: string;
  outcome: 'ok' | 'denied' | 'failed' | 'info';
  detail?: string;
}

export interface BrokerContext {
  settings: BrokerSettings;
  /** This broker's own address (set once it listens) and certificate fingerprint: what the gateway forwards to, what laptops pin. */
  self: { url: string; fingerprint: string };
  meta: MetadataStore;
  store: ChunkStore;
  secrets: BrokerSecrets;
  scheduler: Scheduler;
  hypervisor: DatacenterHypervisor;
  /** Desktop hosts, where each desktop runs online, and their commands. */
  hosts: HostStore;
  /**
   * Client releases (issue 28): the public release key only (`key`: null when none is configured,
   * and then nothing can be published), the bundles' directory, and their records.
   */
  releases: { store: ReleaseStore; key: KeyObject | null; keyB64: string | null; dir: string };
  /** Live per-job transfer progress reported by transfer servers. */
  jobProgress: JobProgress;
  /** Failed-login backoff per user and per source address. */
  throttle: LoginThrottle;
  /** Appends to the audit trail; awaited, so a response never overtakes its audit event. */
  audit(entry: AuditEntry): Promise<void>;
  /** Unwraps lineage keys (master key) and encodes them for the authenticated holder. */
  keysFor(wrapped: Buffer, context: string): string;
}
