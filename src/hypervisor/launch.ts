import { createCipheriv, randomBytes } from 'node:crypto';
import { z } from 'zod';
import { CarryonError, ValidationError } from '../core/errors.js';
import { missingTool, spawnWithSecret } from '../qemu/qemu-tools.js';
import { QmpConnection, type QmpEvent } from '../qemu/qmp.js';
import type { HostFacts } from './host.js';

/** The offline VM config (from the broker, merged with local settings) as `run` accepts it. */
export const OfflineConfig = z.object({
  vcpus: z.number().int().min(1).max(256),
  ramMiB: z.number().int().min(64),
  usb: z.boolean().default(false),
  /** Policy printingAllowed at check-out (restricted by the agent's policy since); absent in older check-outs. */
  printing: z.boolean().optional(),
  nic: z.enum(['user', 'none']).default('user'),
  /** Local setting kept across check-outs (the broker never overrides it). */
  display: z.string().regex(/^[a-z][a-z0-9-]*(,[a-z0-9=._-]+)*$/).optional(),
  usbDevices: z.array(z.object({ vendorId: z.string().regex(/^[0-9a-f]{4}$/i), productId: z.string().regex(/^[0-9a-f]{4}$/i) })).default([]),
});
export type OfflineConfig = z.infer<typeof OfflineConfig>;

export function parseOfflineConfig(raw: unknown): OfflineConfig {
  const r = OfflineConfig.safeParse(raw);
  if (!r.success) throw new ValidationError(`offline VM config is invalid: ${r.error.issues.map((i) => `${i.path.join('.')}: ${i.message}`).join('; ')}`);
  return r.data;
}

export interface LaunchOptions {
  name: string;
  qmpSocket: string;
  /**
   * Host end of the guest agent's virtio-serial channel (org.qemu.guest_agent.0): every desktop
   * has one, so a guest that runs qemu-guest-agent can be frozen around a replica's point in time.
   */
  guestAgentSocket: string;
  /** kvm or tcg: decided by `probeAccel` (or the user), never by /dev/kvm merely existing. */
  accel?: 'kvm' | 'tcg';
  /** Guest serial console: `stdio`, a file path, or none (default). */
  serial?: string;
  /** Extra QEMU arguments, appended as given (`--qemu-arg`). */
  extraArgs?: string[];
  /** Overrides config.display (e.g. "none" for headless). */
  display?: string;
  /** Start with the CPUs stopped (-S). */
  paused?: boolean;
  /** A VNC server on this unix socket only (a desktop host's display, `--display vnc`; never a TCP port). */
  vncSocket?: string;
  /** Guest monitors (virtio-gpu outputs), 1 by default. */
  monitors?: number;
  /**
   * Printing: the command QEMU's user network runs for each guest connection to the printer address
   * (devices/print-relay.ts), only where policy allows it and the host has a CUPS socket.
   */
  printRelay?: string[];
  /** virgl 3D: only where `probeVirgl` showed a working GL stack, and only with a window (gtk, sdl, spice-app). */
  gl?: boolean;
}

/** What `carryon run --display` takes: QEMU's windows, a VNC server on a private unix socket, or nothing. */
export const DISPLAY_KINDS = ['gtk', 'sdl', 'spice-app', 'vnc', 'none'] as const;
export type DisplayKind = (typeof DISPLAY_KINDS)[number];
/** virtio-gpu's limit is 16 outputs; more than 8 monitors on a laptop is a typo. */
export const MAX_MONITORS = 8;
const WINDOWED: readonly string[] = ['gtk', 'sdl', 'spice-app'];

export function parseDisplay(text: string): DisplayKind {
  const kind = text.split(',')[0]!;
  if (!(DISPLAY_KINDS as readonly string[]).includes(kind)) throw new ValidationError(`display must be one of ${DISPLAY_KINDS.join(', ')}, not "${text}"`);
  return kind as DisplayKind;
}

export function parseMonitors(text: string | number): number {
  const n = typeof text === 'number' ? text : /^\d+$/.test(text) ? Number(text) : NaN;
  if (!Number.isInteger(n) || n < 1 || n > MAX_MONITORS) throw new ValidationError(`--monitors must be a whole number from 1 to ${MAX_MONITORS}, not "${text}"`);
  return n;
}

/**
 * The display part of the command line: a window (gtk, sdl, spice-app), VNC on a private unix
 * socket, or none. The guest gets a virtio VGA with one output per monitor (virtio-vga-gl where
 * virgl 3D was probed to work and there is a window to draw it in).
 */
export function displayArgs(display: string, opts: Pick<LaunchOptions, 'vncSocket' | 'monitors' | 'gl'>): string[] {
  const kind = parseDisplay(display);
  const monitors = parseMonitors(opts.monitors ?? 1);
  if (kind === 'vnc' && !opts.vncSocket) throw new ValidationError('--display vnc needs the private socket to listen on');
  if (opts.vncSocket && /[,\s]/.test(opts.vncSocket)) throw new ValidationError(`socket path "${opts.vncSocket}" must not contain commas or spaces`);
  const gl = Boolean(opts.gl) && WINDOWED.includes(kind);
  if (opts.gl && !gl) throw new ValidationError(`3D (virgl) needs a window to draw in: --display ${WINDOWED.join('|')}, not ${kind}`);
  // A window's own options (sdl,grab-mod=…) as the user gave them; gl=on only from the probe.
  const argv = ['-display', kind === 'vnc' ? 'none' : `${kind === 'none' ? 'none' : display}${gl ? ',gl=on' : ''}`];
  if (kind === 'none' && !opts.vncSocket) {
    if (monitors > 1) throw new ValidationError('--monitors needs a display (gtk, sdl, spice-app or vnc)');
    return argv;
  }
  if (monitors === 1 && !gl) argv.push('-vga', 'virtio');
  else argv.push('-vga', 'none', '-device', `${gl ? 'virtio-vga-gl' : 'virtio-vga'},id=video0,max_outputs=${monitors}`);
  if (opts.vncSocket) argv.push('-vnc', `unix:${opts.vncSocket}`);
  return argv;
}

/** The port name qemu-guest-agent looks for (/dev/virtio-ports/org.qemu.guest_agent.0 in the guest). */
export const GUEST_AGENT_PORT = 'org.qemu.guest_agent.0';
const GUEST_AGENT_CHARDEV = 'qga0';

/** RAM left to the host OS and QEMU itself, whatever the config asks for. */
export const HOST_RAM_RESERVE_MIB = 1024;
const NAME_RE = /^[A-Za-z0-9._-]{1,64}$/;

/** One disk as QEMU opens it: the chain's -blockdev JSON and its LUKS secret, encrypted under the launch's master key. */
export interface LaunchDisk {
  name: string;
  /** Top node of the chain (its node-name is the drive). */
  blockdev: Record<string, unknown>;
  secret: { id: string; data: string; iv: string };
  /** The base layer's own secret (one per layer); absent where both layers share `secret`. */
  baseSecret?: { id: string; data: string; iv: string };
}

/** The master secret object: its key comes through a private FIFO (never argv, env or a file at rest). */
export const MASTER_SECRET_ID = 'carryon-master';
export const MASTER_SECRET_FIFO = '@SECRET@';

/**
 * A disk secret as QEMU takes it on a command line: AES-256-CBC under a per-launch master key,
 * so argv (and `--dry-run`, and `ps`) shows only ciphertext.
 */
export function encryptSecret(id: string, secretB64: string, masterKey: Buffer): LaunchDisk['secret'] {
  const iv = randomBytes(16);
  const c = createCipheriv('aes-256-cbc', masterKey, iv);
  const data = Buffer.concat([c.update(Buffer.from(secretB64, 'utf8')), c.final()]);
  return { id, data: data.toString('base64'), iv: iv.toString('base64') };
}

/**
 * Pure: the QEMU argv for an offline desktop. QEMU opens each disk's encrypted chain itself (no
 * Carryon process in the guest's I/O path); the NIC is user-mode, which opens no host port; USB
 * passthrough only when the policy allows it. vCPUs and RAM are clamped to what the host has.
 */
export function buildQemuCommand(config: OfflineConfig, host: HostFacts, disks: LaunchDisk[], opts: LaunchOptions): string[] {
  if (disks.length === 0) throw new ValidationError('a desktop needs at least one disk');
  for (const d of [...disks.map((x) => x.name), opts.name]) {
    if (!NAME_RE.test(d)) throw new ValidationError(`name "${d}" is not usable on a QEMU command line`);
  }
  for (const socket of [opts.qmpSocket, opts.guestAgentSocket]) {
    if (/[,\s]/.test(socket)) throw new ValidationError(`socket path "${socket}" must not contain commas or spaces`);
  }
  const accel = opts.accel ?? (host.kvm ? 'kvm' : 'tcg');
  const vcpus = Math.max(1, Math.min(config.vcpus, host.cpus));
  const hostMiB = Math.floor(host.ramBytes / 2 ** 20);
  const ramMiB = Math.max(64, Math.min(config.ramMiB, hostMiB - HOST_RAM_RESERVE_MIB));
  const argv = ['qemu-system-x86_64', '-name', opts.name, '-machine', 'q35', '-accel', accel];
  argv.push('-cpu', accel === 'kvm' ? 'host' : 'max');
  argv.push('-smp', String(vcpus), '-m', `${ramMiB}M`, '-nodefaults', '-no-user-config');
  argv.push('-object', `secret,id=${MASTER_SECRET_ID},file=${MASTER_SECRET_FIFO},format=base64`);
  disks.forEach((d, i) => {
    for (const sec of d.baseSecret ? [d.secret, d.baseSecret] : [d.secret]) argv.push('-object', `secret,id=${sec.id},data=${sec.data},keyid=${MASTER_SECRET_ID},iv=${sec.iv},format=base64`);
    argv.push('-blockdev', JSON.stringify(d.blockdev));
    argv.push('-device', `virtio-blk-pci,drive=${String(d.blockdev['node-name'])}${i === 0 ? ',bootindex=1' : ''}`);
  });
  argv.push('-nic', config.nic === 'none' ? 'none' : `user,model=virtio-net-pci${printForward(config, opts.printRelay)}`);
  argv.push(...displayArgs(opts.display ?? config.display ?? 'gtk', opts));
  if (opts.serial) argv.push('-serial', opts.serial === 'stdio' ? 'stdio' : `file:${opts.serial}`);
  argv.push('-qmp', `unix:${opts.qmpSocket},server=on,wait=off`);
  // The guest agent's channel: QEMU listens (wait=off: the guest boots whether or not anyone connects).
  argv.push('-chardev', `socket,id=${GUEST_AGENT_CHARDEV},path=${opts.guestAgentSocket},server=on,wait=off`);
  argv.push('-device', 'virtio-serial-pci,id=vser0', '-device', `virtserialport,bus=vser0.0,chardev=${GUEST_AGENT_CHARDEV},name=${GUEST_AGENT_PORT}`);
  // The controller only: devices are hot-plugged once QEMU runs, each decided against the policy's
  // rules (classes, lists, storage) by the holder (devices/usb-hotplug.ts), the configured
  // `usbDevices` too. A usb-host on this line would match by IDs alone, before any rule looked.
  if (config.usb) argv.push('-device', 'qemu-xhci,id=xhci');
  if (opts.paused) argv.push('-S');
  // --qemu-arg is for the user's debugging, not a way around the broker's USB policy.
  if ((opts.extraArgs ?? []).some((a) => /usb|[xeuo]hci/i.test(a))) {
    throw new CarryonError('policy', config.usb
      ? '--qemu-arg may not add USB controllers or devices: attach devices with `carryon usb attach`, which applies the broker\'s USB policy'
      : 'USB is not allowed for this desktop by the broker\'s policy: --qemu-arg may not add USB controllers or devices');
  }
  argv.push(...(opts.extraArgs ?? []));
  return argv;
}

/** Where the guest finds its printer (IPP) when printing is allowed: an address of QEMU's user network, no host port opened. */
export const PRINTER_ADDRESS = '10.0.2.100';
export const IPP_PORT = 631;

/** The guestfwd to the print relay, or nothing: only where the (effective) policy allows printing. */
function printForward(config: OfflineConfig, relay: string[] | undefined): string {
  if (!relay) return '';
  if (config.printing !== true) throw new CarryonError('policy', 'printing is not allowed for this desktop by the broker\'s policy');
  // QEMU runs it through /bin/sh and splits its option on commas: plain words only.
  for (const a of relay) if (!/^[A-Za-z0-9_./:=+-]+$/.test(a)) throw new ValidationError(`print relay argument "${a}" is not usable on a QEMU command line`);
  return `,guestfwd=tcp:${PRINTER_ADDRESS}:${IPP_PORT}-cmd:${relay.join(' ')}`;
}

/** Shell-quoted argv for --dry-run output. */
export function formatCommand(argv: string[]): string {
  return argv.map((a) => (/^[A-Za-z0-9_./:=,+-]+$/.test(a) ? a : `'${a.replace(/'/g, `'\\''`)}'`)).join(' ');
}

export interface RunningDesktop {
  pid: number;
  /** Resolves with QEMU's exit code once it has exited. */
  exited: Promise<number>;
  /** ACPI power-down, then QMP quit after `graceMs`, then SIGKILL; resolves with the exit code. */
  stop(graceMs?: number): Promise<number>;
  /** How the last `stop` ended it: the guest powered off (acpi), or QEMU was told to quit or killed. */
  readonly stoppedBy: 'acpi' | 'quit' | 'kill' | null;
  /** A QMP command (e.g. query-status). */
  qmp(command: string, args?: Record<string, unknown>): Promise<unknown>;
  /** The QMP connection itself (the VM's QEMU is also a block host: fill jobs run in it). */
  connection: QmpConnection;
  /** Unix socket of the guest agent's channel (connect with GuestAgent.connect); null if the command line has none. */
  guestAgentSocket: string | null;
  /** SIGKILL, for a second Ctrl-C. */
  kill(): void;
}

/** What the holder's log says of QEMU's BLOCK_IO_ERROR event (which layer, which operation, why). */
export function blockIoErrorLine(e: QmpEvent): string {
  const d = e.data ?? {};
  const node = typeof d['node-name'] === 'string' && d['node-name'] ? d['node-name'] : typeof d.device === 'string' ? d.device : 'a disk';
  const nospace = d.nospace === true ? ', no space left on the host' : '';
  return `QEMU: a guest ${String(d.operation ?? 'I/O')} on ${node} failed (${String(d.reason ?? 'no reason given')}${nospace}); the guest was told (action: ${String(d.action ?? '?')})`;
}

/** Spawns QEMU and connects to its QMP socket. The caller flushes its disks after `exited`. */
export async function launchDesktop(argv: string[], qmpSocket: string, opts: { stdio?: 'inherit' | 'ignore'; masterKey?: Buffer; guestAgentSocket?: string } = {}): Promise<RunningDesktop> {
  // stderr is always captured (and echoed), so a QEMU that dies at start says why.
  const child = await spawnWithSecret(argv[0]!, argv.slice(1), opts.masterKey?.toString('base64'), [opts.stdio === 'ignore' ? 'ignore' : 'inherit', opts.stdio === 'ignore' ? 'ignore' : 'inherit', 'pipe']);
  if (opts.stdio !== 'ignore') child.stderr?.on('data', (d: Buffer) => process.stderr.write(d));
  let stderr = '';
  child.stderr?.on('data', (d: Buffer) => (stderr += d.toString()));
  const exited = new Promise<number>((resolve, reject) => {
    child.once('error', (err: NodeJS.ErrnoException) => reject(err.code === 'ENOENT' ? missingTool(argv[0]!) : err));
    child.once('exit', (code, sig) => resolve(code ?? (sig ? 128 : 1)));
  });
  let qmp: QmpConnection | undefined;
  // QEMU creates the QMP socket shortly after start; give it a bounded number of tries.
  for (let i = 0; i < 100 && !qmp; i++) {
    const early = await Promise.race([exited.then((c) => c), new Promise<null>((r) => setTimeout(() => r(null), 100))]);
    if (early !== null) throw new CarryonError('qemu-failed', `QEMU exited at start (code ${early})${stderr ? `: ${stderr.trim()}` : ''}`);
    qmp = await QmpConnection.open(qmpSocket).catch(() => undefined);
  }
  if (!qmp) {
    child.kill('SIGKILL');
    throw new Error('QEMU did not open its QMP socket within 10 s');
  }
  const conn = qmp;
  exited.finally(() => conn.close()).catch(() => undefined);
  // A guest read or write the disk chain failed: the guest sees an I/O error, QEMU itself prints nothing.
  if (opts.stdio !== 'ignore') conn.onEvent('BLOCK_IO_ERROR', (e) => process.stderr.write(`${blockIoErrorLine(e)}\n`));
  const withTimeout = <T>(p: Promise<T>, ms: number) =>
    Promise.race([p, new Promise<never>((_, rej) => setTimeout(() => rej(new Error('QMP timed out')), ms).unref())]);
  let stoppedBy: RunningDesktop['stoppedBy'] = null;
  return {
    pid: child.pid!,
    exited,
    get stoppedBy() {
      return stoppedBy;
    },
    connection: conn,
    guestAgentSocket: opts.guestAgentSocket ?? null,
    kill: () => void child.kill('SIGKILL'),
    qmp: (command, args) => withTimeout(conn.execute(command, args), 10_000),
    async stop(graceMs = 60_000) {
      const done = (ms: number) => Promise.race([exited, new Promise<null>((r) => setTimeout(() => r(null), ms).unref())]);
      await withTimeout(conn.execute('system_powerdown'), 5_000).catch(() => undefined);
      let code = await done(graceMs);
      if (code !== null) {
        stoppedBy ??= 'acpi';
        return code;
      }
      stoppedBy = 'quit';
      await withTimeout(conn.execute('quit'), 5_000).catch(() => undefined);
      code = await done(10_000);
      if (code !== null) return code;
      stoppedBy = 'kill';
      child.kill('SIGKILL');
      return exited;
    },
  };
}
