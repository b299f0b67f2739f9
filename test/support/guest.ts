/**
 * A bootable Linux test guest built from the Debian packages on this machine: the distribution
 * kernel (linux-image-amd64), busybox (busybox-static) and the kernel modules needed to reach an
 * ext4 filesystem on a virtio-blk disk. Tests boot it under QEMU (TCG is enough) so a real guest
 * kernel reads and writes a disk we serve, and e2fsprogs checks the result from the host.
 *
 * The guest's work is chosen on the kernel command line (see `guestAppend`); its serial console
 * reports back with marker lines (see `parseGuestSerial`).
 */
import { execFile, spawn } from 'node:child_process';
import { existsSync, readdirSync, readFileSync } from 'node:fs';
import { mkdir, mkdtemp, open, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { basename, dirname, join } from 'node:path';
import { promisify } from 'node:util';
import { gunzipSync, gzipSync } from 'node:zlib';
import { QemuSecrets } from './qemu-secret.js';

const run = promisify(execFile);

/** Printed by the guest's /init as its last line when every action succeeded. */
export const GUEST_DONE = 'CARRYON-GUEST-DONE';
/** Printed by the guest's /init, with a reason, when anything failed (then it powers off). */
export const GUEST_FAIL = 'CARRYON-GUEST-FAIL';

/** Printed by the writer after each fdatasync: records 1..n are durable on the guest's disk. */
export const WRITER_DURABLE = 'CARRYON-REC';
/** Printed by the guest's /sbin/shutdown when the agent's guest-shutdown runs it. */
export const GUEST_SHUTDOWN_ASKED = 'CARRYON-SHUTDOWN-ASKED';
/** The writer stops when this file exists (/sbin/shutdown makes it). */
const WRITER_STOP_FILE = '/tmp/carryon-stop';

// The writer's records: fixed-size lines `CARRYON-REC <n, 10 digits> <check, 8 hex> <pad>\n`,
// the check a function of n that the host recomputes, so a torn, stale or zeroed record shows.
export const WRITER_RECORD_BYTES = 64;
const CHECK_MUL = 2654435761;
const CHECK_ADD = 40503;
const WRITER_PAD = '.'.repeat(WRITER_RECORD_BYTES - 'CARRYON-REC 0000000000 00000000 \n'.length);
const WRITER_RECORD_FORMAT = `CARRYON-REC %010d %08x ${WRITER_PAD}\\n`;

/** Record n exactly as the guest's writer writes it. */
export function writerRecord(n: number): string {
  const check = Number((BigInt(n) * BigInt(CHECK_MUL) + BigInt(CHECK_ADD)) % 4294967296n);
  return `CARRYON-REC ${String(n).padStart(10, '0')} ${check.toString(16).padStart(8, '0')} ${WRITER_PAD}\n`;
}

export interface WriterRecords {
  /** Records 1..count are present, in order, each exactly as written. */
  count: number;
  /** Bytes after them: a record cut short by a crash (a prefix of the next one, then zeros at most). */
  tornBytes: number;
}

/**
 * Checks the writer's file from a disk image: a clean prefix of records 1..N, nothing else but
 * possibly the next record cut short (an append a crash interrupted). Throws on anything else
 * (a missing, repeated, reordered or damaged record).
 */
export function verifyWriterRecords(data: Buffer): WriterRecords {
  let count = 0;
  while ((count + 1) * WRITER_RECORD_BYTES <= data.length) {
    const at = count * WRITER_RECORD_BYTES;
    if (data.toString('latin1', at, at + WRITER_RECORD_BYTES) !== writerRecord(count + 1)) break;
    count++;
  }
  const rest = data.subarray(count * WRITER_RECORD_BYTES);
  const next = Buffer.from(writerRecord(count + 1), 'latin1');
  let same = 0;
  while (same < rest.length && same < next.length && rest[same] === next[same]) same++;
  const bad = rest.subarray(same).findIndex((b) => b !== 0);
  if (bad >= 0) {
    const off = count * WRITER_RECORD_BYTES + same + bad;
    throw new Error(`writer records: ${count} good, then damage at byte ${off} (record ${count + 1}): ${JSON.stringify(data.toString('latin1', count * WRITER_RECORD_BYTES, count * WRITER_RECORD_BYTES + WRITER_RECORD_BYTES))}`);
  }
  return { count, tornBytes: rest.length };
}

/**
 * `verifyWriterRecords` on the file `path` inside a raw ext4 image (read with debugfs, no mount).
 * An image taken from a running guest (crash-consistent) is read after its journal is replayed
 * on a copy, as a mount would: records only in the journal count.
 */
export async function writerRecordsInImage(rawImage: string, path: string): Promise<WriterRecords> {
  return withReplayedJournal(rawImage, async (img) => verifyWriterRecords(await readExt4File(img, path)));
}

export interface Ext4Check {
  /** `e2fsck -fn` found nothing to fix (after the journal replay, if one was due). */
  clean: boolean;
  /** The image needed a journal replay (taken from a mounted file system without a freeze). */
  journalReplayed: boolean;
  /** e2fsck's report. */
  output: string;
}

async function needsRecovery(rawImage: string): Promise<boolean> {
  const { stdout } = await run('dumpe2fs', ['-h', rawImage]).catch((e: Error) => {
    throw new Error(`dumpe2fs -h ${rawImage} failed (package e2fsprogs): ${e.message}`);
  });
  const features = /^Filesystem features:\s*(.*)$/m.exec(stdout)?.[1] ?? '';
  return features.split(/\s+/).includes('needs_recovery');
}

/** Runs `fn` on the image, or on a temporary copy with its journal replayed when one is due (the image is never changed). */
async function withReplayedJournal<T>(rawImage: string, fn: (image: string, replayed: boolean) => Promise<T>): Promise<T> {
  if (!(await needsRecovery(rawImage))) return fn(rawImage, false);
  const tmp = await mkdtemp(join(tmpdir(), 'carryon-fsck-'));
  try {
    const copy = join(tmp, 'replayed.raw');
    await run('cp', ['--sparse=always', '--reflink=auto', rawImage, copy]);
    await run('e2fsck', ['-E', 'journal_only', '-p', copy]).catch((e: Error & { stdout?: string }) => {
      throw new Error(`e2fsck could not replay the journal of ${rawImage}: ${e.stdout ?? ''}${e.message}`);
    });
    return await fn(copy, true);
  } finally {
    await rm(tmp, { recursive: true, force: true });
  }
}

/**
 * `e2fsck -fn` on a raw ext4 image, as a restore point is checked: a quiesced one (frozen:
 * journal flushed, no recovery due) is checked as it is; a crash-consistent one after its
 * journal is replayed on a copy, as the next mount would.
 */
export async function checkExt4Image(rawImage: string): Promise<Ext4Check> {
  return withReplayedJournal(rawImage, async (img, journalReplayed) => {
    try {
      const { stdout, stderr } = await run('e2fsck', ['-f', '-n', img]);
      return { clean: true, journalReplayed, output: `${stdout}${stderr}` };
    } catch (e) {
      const err = e as Error & { code?: unknown; stdout?: string; stderr?: string };
      if (typeof err.code !== 'number') throw new Error(`cannot run e2fsck (package e2fsprogs): ${err.message}`);
      return { clean: false, journalReplayed, output: `${err.stdout ?? ''}${err.stderr ?? ''}` };
    }
  });
}

/** The highest record number the guest reported durable on its serial console (0 if none yet). */
export function lastDurableRecord(serial: string): number {
  let last = 0;
  for (const m of serial.matchAll(/^CARRYON-REC (\d+)\r?$/gm)) last = Math.max(last, Number(m[1]));
  return last;
}

// ---------------------------------------------------------------------------------------------
// Kernel

/** Orders kernel releases like `6.1.0-56-amd64` numerically, part by part. */
function compareReleases(a: string, b: string): number {
  const pa = a.split(/[.-]/);
  const pb = b.split(/[.-]/);
  for (let i = 0; i < Math.max(pa.length, pb.length); i++) {
    const x = pa[i] ?? '';
    const y = pb[i] ?? '';
    const nx = Number(x);
    const ny = Number(y);
    const c = Number.isInteger(nx) && Number.isInteger(ny) && x !== '' && y !== '' ? nx - ny : x.localeCompare(y);
    if (c !== 0) return c;
  }
  return 0;
}

/**
 * Path of the newest Debian kernel in /boot that also has its modules installed (a kernel
 * without /lib/modules/<release> cannot reach a virtio disk from our initramfs).
 */
export function guestKernel(bootDir = '/boot', modulesRoot = '/lib/modules'): string {
  let names: string[] = [];
  try {
    names = readdirSync(bootDir);
  } catch {
    // no /boot at all: same message as an empty one
  }
  const releases = names
    .filter((n) => n.startsWith('vmlinuz-'))
    .map((n) => n.slice('vmlinuz-'.length))
    .filter((r) => existsSync(join(modulesRoot, r, 'modules.dep')))
    .sort(compareReleases);
  const newest = releases.at(-1);
  if (!newest) {
    throw new Error(
      `no Debian kernel found (${bootDir}/vmlinuz-* with ${modulesRoot}/<release>/modules.dep): ` +
        'install the package linux-image-amd64 (scripts/install-deps does)',
    );
  }
  return join(bootDir, `vmlinuz-${newest}`);
}

/** The release (`uname -r`) of a kernel image named /boot/vmlinuz-<release>. */
export function kernelRelease(kernelPath: string): string {
  const name = basename(kernelPath);
  if (!name.startsWith('vmlinuz-')) throw new Error(`cannot tell the kernel release of ${kernelPath} (expected vmlinuz-<release>)`);
  return name.slice('vmlinuz-'.length);
}

// ---------------------------------------------------------------------------------------------
// newc cpio (the format the kernel unpacks as an initramfs)

export interface CpioEntry {
  /** Path inside the archive, without a leading slash (e.g. `bin/busybox`). */
  name: string;
  /** Full st_mode: file type bits and permissions (e.g. 0o100755). */
  mode: number;
  /** File contents, or a symlink's target. */
  data?: Buffer;
  /** Device number of a character or block device node. */
  rdev?: { major: number; minor: number };
}

export const S_IFDIR = 0o040000;
export const S_IFREG = 0o100000;
export const S_IFLNK = 0o120000;
export const S_IFCHR = 0o020000;

function hex8(n: number): string {
  if (!Number.isInteger(n) || n < 0 || n > 0xffffffff) throw new Error(`cpio field out of range: ${n}`);
  return n.toString(16).padStart(8, '0');
}

const pad4 = (n: number) => (4 - (n % 4)) % 4;

/**
 * An uncompressed newc ("070701") cpio archive of `entries`, in order, plus the trailer.
 * Each record: 110-byte ASCII header, NUL-terminated name padded to 4 bytes, data padded to 4.
 * Directories must come before their contents (the kernel creates entries in order).
 */
export function newcArchive(entries: CpioEntry[]): Buffer {
  const parts: Buffer[] = [];
  const mtime = 0; // reproducible archives: same inputs, same bytes
  const record = (ino: number, e: CpioEntry) => {
    const data = e.data ?? Buffer.alloc(0);
    const name = Buffer.from(`${e.name}\0`, 'utf8');
    const nlink = (e.mode & 0o170000) === S_IFDIR ? 2 : 1;
    const header =
      '070701' +
      [ino, e.mode, 0, 0, nlink, mtime, data.length, 0, 0, e.rdev?.major ?? 0, e.rdev?.minor ?? 0, name.length, 0].map(hex8).join('');
    parts.push(Buffer.from(header, 'ascii'), name, Buffer.alloc(pad4(110 + name.length)), data, Buffer.alloc(pad4(data.length)));
  };
  entries.forEach((e, i) => {
    if (e.name.startsWith('/') || e.name === '') throw new Error(`cpio names are relative: ${JSON.stringify(e.name)}`);
    record(i + 1, e);
  });
  record(0, { name: 'TRAILER!!!', mode: 0 });
  return Buffer.concat(parts);
}

// ---------------------------------------------------------------------------------------------
// Kernel modules

/** Modules a q35 guest needs to mount ext4 on virtio-blk (their dependencies are added). */
export const GUEST_MODULES = ['virtio_pci', 'virtio_blk', 'ext4'];

export interface GuestModule {
  /** Module name with `_` (as insmod/lsmod show it). */
  name: string;
  /** Absolute path of the .ko / .ko.xz / .ko.zst / .ko.gz on the host. */
  path: string;
  /** Soft dependency (e.g. crc32c_intel): loading it may fail on some CPUs, which is fine. */
  optional: boolean;
}

const modName = (file: string) => basename(file).replace(/\.ko(\.(xz|zst|gz))?$/, '').replace(/-/g, '_');

/**
 * The modules to load, dependencies first, to get `roots` working: hard dependencies from
 * modules.dep, plus softdep "pre:" modules (ext4 and jbd2 want `crypto-crc32c`), resolved through
 * modules.alias. Modules built into the kernel (modules.builtin) are skipped.
 */
export function resolveModules(moduleDir: string, roots: string[] = GUEST_MODULES): GuestModule[] {
  const depText = readFileSync(join(moduleDir, 'modules.dep'), 'utf8');
  const read = (f: string) => (existsSync(join(moduleDir, f)) ? readFileSync(join(moduleDir, f), 'utf8') : '');
  const files = new Map<string, string>();
  const deps = new Map<string, string[]>();
  for (const line of depText.split('\n')) {
    const m = /^([^:]+):\s*(.*)$/.exec(line);
    if (!m) continue;
    const name = modName(m[1]!);
    files.set(name, m[1]!);
    deps.set(name, m[2]!.split(/\s+/).filter(Boolean).map(modName));
  }
  const builtin = new Set(read('modules.builtin').split('\n').filter(Boolean).map(modName));
  const aliases = new Map<string, string[]>();
  for (const line of read('modules.alias').split('\n')) {
    const m = /^alias\s+(\S+)\s+(\S+)$/.exec(line);
    if (!m) continue;
    const key = m[1]!.replace(/-/g, '_');
    aliases.set(key, [...(aliases.get(key) ?? []), modName(m[2]!)]);
  }
  const softPre = new Map<string, string[]>();
  for (const line of read('modules.softdep').split('\n')) {
    const m = /^softdep\s+(\S+)\s+(.*)$/.exec(line);
    if (!m) continue;
    const pre = /pre:\s*(.*?)(\s+post:|$)/.exec(m[2]!)?.[1]?.split(/\s+/).filter(Boolean) ?? [];
    softPre.set(modName(m[1]!), pre);
  }
  const lookup = (want: string): string[] => {
    const n = want.replace(/-/g, '_');
    if (files.has(n) || builtin.has(n)) return [n];
    return aliases.get(n) ?? [];
  };

  const out: GuestModule[] = [];
  const seen = new Set<string>();
  const visit = (name: string, optional: boolean, path: string[]) => {
    if (builtin.has(name) && !files.has(name)) return;
    if (seen.has(name)) {
      // a module first reached as optional becomes required when a hard dependency needs it
      if (!optional) for (const m of out) if (m.name === name) m.optional = false;
      return;
    }
    if (path.includes(name)) throw new Error(`module dependency cycle: ${[...path, name].join(' → ')}`);
    const file = files.get(name);
    if (!file) {
      if (optional) return;
      throw new Error(`kernel module ${name} is not in ${moduleDir}/modules.dep (needed by ${path.join(' → ') || 'the guest'})`);
    }
    for (const soft of softPre.get(name) ?? []) for (const s of lookup(soft)) visit(s, true, [...path, name]);
    for (const d of deps.get(name) ?? []) visit(d, optional, [...path, name]);
    seen.add(name);
    out.push({ name, path: file.startsWith('/') ? file : join(moduleDir, file), optional });
  };
  for (const r of roots) {
    const found = lookup(r);
    if (found.length === 0) throw new Error(`kernel module ${r} is not in ${moduleDir} (modules.dep, modules.alias, modules.builtin)`);
    for (const f of found) visit(f, false, []);
  }
  return out;
}

/** A module file's bytes, decompressed: the Debian kernel cannot load compressed modules itself. */
async function moduleBytes(path: string): Promise<Buffer> {
  const raw = await readFile(path);
  if (path.endsWith('.gz')) return gunzipSync(raw);
  const tool = path.endsWith('.xz') ? 'xz' : path.endsWith('.zst') ? 'zstd' : null;
  if (!tool) return raw;
  return await new Promise<Buffer>((resolve, reject) => {
    const child = spawn(tool, ['-dc', path], { stdio: ['ignore', 'pipe', 'pipe'] });
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    child.stdout.on('data', (b: Buffer) => out.push(b));
    child.stderr.on('data', (b: Buffer) => err.push(b));
    child.on('error', (e) => reject(new Error(`cannot run ${tool} to decompress ${path}: ${e.message}`)));
    child.on('close', (code) =>
      code === 0 ? resolve(Buffer.concat(out)) : reject(new Error(`${tool} -dc ${path} failed: ${Buffer.concat(err).toString().trim()}`)),
    );
  });
}

// ---------------------------------------------------------------------------------------------
// /init

/**
 * The guest's /init (busybox sh). Loads the modules in order, mounts the disk, runs the
 * `carryon.*` actions from /proc/cmdline in order, unmounts and powers off. Every failure ends in
 * one `CARRYON-GUEST-FAIL <reason>` line and a power-off, so the host never waits for a timeout.
 */
function initScript(modules: GuestModule[], guestAgent: boolean, powerButton: boolean): string {
  const loads = modules
    .map((m) =>
      m.optional
        ? `insmod /lib/modules/${m.name}.ko 2>/dev/null || echo "carryon-guest: optional module ${m.name} not loaded"`
        : `insmod /lib/modules/${m.name}.ko || fail "insmod ${m.name}"`,
    )
    .join('\n');
  return `#!/bin/sh
/bin/busybox --install -s /bin
export PATH=/bin
set -f  # /proc/cmdline tokens are data, never globs

fail() {
  echo "${GUEST_FAIL} $*"
  cd /
  umount /mnt 2>/dev/null
  sync
  poweroff -f
  sleep 30
  exit 1  # init exiting panics the kernel; panic=-1 and -no-reboot then end QEMU
}

mount -t devtmpfs devtmpfs /dev || fail "mount devtmpfs"
mount -t proc proc /proc || fail "mount proc"
mount -t sysfs sysfs /sys || fail "mount sysfs"
echo "CARRYON-GUEST-INIT uptime=$(cut -d' ' -f1 /proc/uptime)"

${loads}

dev=/dev/vda
fstype=ext4
wait=30
for tok in $(cat /proc/cmdline); do
  case "$tok" in
    carryon.dev=*) dev="\${tok#carryon.dev=}" ;;
    carryon.fstype=*) fstype="\${tok#carryon.fstype=}" ;;
    carryon.wait=*) wait="\${tok#carryon.wait=}" ;;
  esac
done

i=0
while [ ! -b "$dev" ]; do
  i=$((i + 1))
  [ "$i" -gt $((wait * 10)) ] && fail "no block device $dev after \${wait}s"
  usleep 100000
done
mkdir -p /mnt
mount -t "$fstype" "$dev" /mnt || fail "mount $dev as $fstype"
${guestAgent ? agentStart() : ''}${powerButton ? powerButtonWatch() : ''}
# spec is PATH:REST; the path may not contain ':'
target() { p="\${1%%:*}"; case "$p" in /*) ;; *) fail "path must be absolute: $p" ;; esac; }
for tok in $(cat /proc/cmdline); do
  case "$tok" in
    carryon.write=*)
      spec="\${tok#carryon.write=}"; target "$spec"
      mkdir -p "/mnt\${p%/*}" && printf '%s' "\${spec#*:}" > "/mnt$p" || fail "write $p" ;;
    carryon.write64=*)
      spec="\${tok#carryon.write64=}"; target "$spec"
      mkdir -p "/mnt\${p%/*}" && printf '%s' "\${spec#*:}" | base64 -d > "/mnt$p" || fail "write64 $p" ;;
    carryon.fill=*)
      spec="\${tok#carryon.fill=}"; target "$spec"
      mkdir -p "/mnt\${p%/*}" && dd if=/dev/urandom of="/mnt$p" bs=1048576 count="\${spec#*:}" 2>/dev/null || fail "fill $p" ;;
    carryon.rm=*)
      p="\${tok#carryon.rm=}"; rm -f "/mnt$p" || fail "rm $p" ;;
    carryon.read=*)
      p="\${tok#carryon.read=}"
      [ -f "/mnt$p" ] || fail "read $p: no such file"
      echo "CARRYON-READ-BEGIN $p"
      base64 "/mnt$p" || fail "read $p"
      echo "CARRYON-READ-END $p" ;;
    carryon.sha256=*)
      p="\${tok#carryon.sha256=}"
      h="$(sha256sum "/mnt$p")" || fail "sha256 $p"
      echo "CARRYON-SHA256 \${h%% *} $p" ;;
    carryon.writer=*)
      spec="\${tok#carryon.writer=}"; target "$spec"; every="\${spec#*:}"
      case "$every" in ''|*[!0-9]*) fail "writer $p: records per sync must be a number: $every" ;; esac
      mkdir -p "/mnt\${p%/*}" && : > "/mnt$p" || fail "writer $p"
      exec 3>>"/mnt$p" || fail "writer $p: open"
      n=0
      echo "CARRYON-WRITER-START $p"
      # Until /sbin/shutdown (the agent's guest-shutdown) asks to stop: records, then fdatasync, then the number.
      while [ ! -e ${WRITER_STOP_FILE} ]; do
        i=0
        while [ "$i" -lt "$every" ]; do
          n=$((n + 1)); i=$((i + 1))
          printf '${WRITER_RECORD_FORMAT}' "$n" $(( (n * ${CHECK_MUL} + ${CHECK_ADD}) % 4294967296 )) >&3 || fail "writer $p: record $n"
        done
        sync -d "/mnt$p" || fail "writer $p: fdatasync"
        echo "${WRITER_DURABLE} $n"
      done
      exec 3>&-
      echo "CARRYON-WRITER-STOP $n" ;;
    carryon.shell=*)
      tty="\${tok#carryon.shell=}"
      [ -c "$tty" ] || fail "shell: no terminal $tty"
      [ -n "$pwr" ] || [ -x /sbin/shutdown ] || fail "shell: nothing would ever end it (build the initramfs with powerButton or guestAgent)"
      echo "Carryon test desktop: its data disk $dev is /mnt; type a command." > "$tty"
      # A session of its own with the terminal as its controlling tty (opened after setsid), in the data disk.
      ( cd /mnt && PS1='desktop:\\w# ' HOME=/mnt exec setsid sh -c "exec sh -i <>$tty >&0 2>&0" ) &
      shell=$!
      echo "${GUEST_SHELL} $tty"
      while [ ! -e ${WRITER_STOP_FILE} ]; do usleep 100000; done
      # Off the data disk before it is unmounted: what it wrote and synced stays, the rest is the guest's page cache.
      kill -9 "$shell" 2>/dev/null
      wait "$shell" 2>/dev/null
      echo "CARRYON-SHELL-END" ;;
    carryon.*=*) ;;
    carryon.*) fail "unknown action $tok" ;;
  esac
done

sync
umount /mnt || fail "umount $dev"
echo "${GUEST_DONE} rc=0 uptime=$(cut -d' ' -f1 /proc/uptime)"
poweroff -f
sleep 30
`;
}

/** qemu-ga's channel, found by its name in sysfs (no udev here to make /dev/virtio-ports/). */
function agentStart(): string {
  return `
port=
i=0
while [ -z "$port" ]; do
  for v in $(ls /sys/class/virtio-ports 2>/dev/null); do
    [ "$(cat /sys/class/virtio-ports/$v/name 2>/dev/null)" = ${GUEST_AGENT_PORT} ] && port=/dev/$v
  done
  [ -n "$port" ] && [ -c "$port" ] && break
  port=
  i=$((i + 1))
  [ "$i" -gt 100 ] && fail "no virtio port ${GUEST_AGENT_PORT} (QEMU needs -device virtserialport,name=${GUEST_AGENT_PORT})"
  usleep 100000
done
mkdir -p /dev/virtio-ports && ln -sf "$port" /dev/virtio-ports/${GUEST_AGENT_PORT}
LD_LIBRARY_PATH=${GUEST_LIB_DIR} /usr/sbin/qemu-ga -m virtio-serial -p "$port" -t /tmp &
echo "${GUEST_AGENT_STARTED} $port"
`;
}

/**
 * An ACPI power-button press (QMP system_powerdown, `carryon run`'s Ctrl-C) ends the writer as
 * guest-shutdown does. No acpid: one read of the button's evdev node (a whole 24-byte event; a
 * shorter read is refused by evdev) is the press.
 */
function powerButtonWatch(): string {
  return `
pwr=
i=0
while [ -z "$pwr" ]; do
  for e in $(ls /sys/class/input 2>/dev/null); do
    case "$e" in event*) [ "$(cat /sys/class/input/$e/device/name 2>/dev/null)" = "Power Button" ] && [ -c /dev/input/$e ] && pwr=/dev/input/$e ;; esac
  done
  [ -n "$pwr" ] && break
  i=$((i + 1))
  [ "$i" -gt 100 ] && fail "no ACPI power button in /sys/class/input"
  usleep 100000
done
( dd if="$pwr" of=/dev/null bs=24 count=1 2>/dev/null && touch ${WRITER_STOP_FILE} && echo "${GUEST_POWER_BUTTON}" ) &
`;
}

export interface InitramfsOptions {
  /** Kernel release whose modules to include; default: that of `guestKernel()`. */
  kernelRelease?: string;
  /** Default /lib/modules. */
  modulesRoot?: string;
  /** A statically linked busybox; default /bin/busybox (package busybox-static). */
  busybox?: string;
  /** More modules to include and load at boot (names or aliases), after the defaults. */
  extraModules?: string[];
  /** File name inside `dir`; default initramfs.cpio.gz. */
  name?: string;
  /**
   * Put qemu-guest-agent in (its binary and shared libraries from this host, package
   * qemu-guest-agent) and start it on the org.qemu.guest_agent.0 port before the guest's work.
   * The guest then needs that port (`guestAgentQemuArgs`, or `carryon run`).
   */
  guestAgent?: boolean;
  /** Default /usr/sbin/qemu-ga. */
  guestAgentBinary?: string;
  /** An ACPI power-button press (QMP system_powerdown) stops the writer, then the guest unmounts and powers off. */
  powerButton?: boolean;
}

export const GUEST_AGENT_BINARY = '/usr/sbin/qemu-ga';
/** The virtio-serial port driver the agent's channel needs (the writer needs nothing more). */
export const GUEST_AGENT_MODULES = ['virtio_console'];
/** The ACPI power button's driver and the evdev node it is read through. */
export const POWER_BUTTON_MODULES = ['button', 'evdev'];
/** Printed by the guest's /init once the interactive shell runs (`shell` action), with its terminal. */
export const GUEST_SHELL = 'CARRYON-SHELL';
/** Printed by the guest when its power button was pressed. */
export const GUEST_POWER_BUTTON = 'CARRYON-POWER-BUTTON';
/** Printed by /init once qemu-ga runs, with the port's device. */
export const GUEST_AGENT_STARTED = 'CARRYON-QGA-STARTED';
const GUEST_AGENT_PORT = 'org.qemu.guest_agent.0';
const GUEST_LIB_DIR = '/lib/x86_64-linux-gnu';

/** The shared objects `ldd` names for `binary` (the ELF interpreter included), as absolute host paths. */
export async function sharedLibraries(binary: string): Promise<string[]> {
  const { stdout } = await run('ldd', [binary]).catch((e: Error) => {
    throw new Error(`ldd ${binary} failed (is it installed? package qemu-guest-agent): ${e.message}`);
  });
  const libs: string[] = [];
  for (const line of stdout.split('\n')) {
    const m = /=>\s*(\/\S+)/.exec(line) ?? /^\s*(\/\S+)\s+\(/.exec(line);
    if (m) libs.push(m[1]!);
    else if (/not found/.test(line)) throw new Error(`ldd ${binary}: ${line.trim()}`);
  }
  return libs;
}

/**
 * qemu-ga and what it needs inside the initramfs: the binary, its libraries at the paths the
 * dynamic loader looks in, and a /sbin/shutdown for guest-shutdown (QGA 7.2 runs
 * `/sbin/shutdown -P +0`; busybox has none) that tells /init to finish: the writer stops, the
 * disk is unmounted, the guest powers off.
 */
async function guestAgentEntries(binary: string): Promise<CpioEntry[]> {
  let bin: Buffer;
  try {
    bin = await readFile(binary);
  } catch {
    throw new Error(`${binary} missing: install the package qemu-guest-agent (scripts/install-deps does)`);
  }
  const dirs = new Set<string>(['usr', 'usr/sbin', 'sbin', 'var', 'var/run']);
  const files: CpioEntry[] = [{ name: 'usr/sbin/qemu-ga', mode: S_IFREG | 0o755, data: bin }];
  for (const lib of await sharedLibraries(binary)) {
    const rel = lib.replace(/^\/+/, '');
    // each library keeps its host path (ld.so's own path is written into the binary); readFile follows links
    for (let d = dirname(rel); d !== '.' && d !== 'lib'; d = dirname(d)) dirs.add(d); // lib/ is there already
    files.push({ name: rel, mode: S_IFREG | 0o755, data: await readFile(lib) });
  }
  files.push({ name: 'sbin/shutdown', mode: S_IFREG | 0o755, data: Buffer.from(`#!/bin/sh\n/bin/busybox touch ${WRITER_STOP_FILE}\necho "${GUEST_SHUTDOWN_ASKED} $*" > /dev/console\n`) });
  const dirEntries = [...dirs].sort((a, b) => a.split('/').length - b.split('/').length || a.localeCompare(b));
  return [...dirEntries.map((name) => ({ name, mode: S_IFDIR | 0o755 })), ...files];
}

/** Checks the ELF header says "no program interpreter", i.e. the binary runs with no libc around. */
function isStaticElf(bin: Buffer): boolean {
  if (bin.readUInt32BE(0) !== 0x7f454c46 || bin[4] !== 2) return false; // ELF64 only
  const phoff = Number(bin.readBigUInt64LE(0x20));
  const phentsize = bin.readUInt16LE(0x36);
  const phnum = bin.readUInt16LE(0x38);
  for (let i = 0; i < phnum; i++) if (bin.readUInt32LE(phoff + i * phentsize) === 3) return false; // PT_INTERP
  return true;
}

/**
 * Writes a gzip'd newc initramfs into `dir` and returns its path: busybox, the guest modules
 * (decompressed), /dev/console for init's stdio, and /init.
 */
export async function buildInitramfs(dir: string, opts: InitramfsOptions = {}): Promise<string> {
  const release = opts.kernelRelease ?? kernelRelease(guestKernel());
  const moduleDir = join(opts.modulesRoot ?? '/lib/modules', release);
  const busyboxPath = opts.busybox ?? '/bin/busybox';
  let busybox: Buffer;
  try {
    busybox = await readFile(busyboxPath);
  } catch {
    throw new Error(`${busyboxPath} missing: install the package busybox-static (scripts/install-deps does)`);
  }
  if (!isStaticElf(busybox)) throw new Error(`${busyboxPath} is not statically linked: install the package busybox-static`);
  const modules = resolveModules(moduleDir, [...GUEST_MODULES, ...(opts.guestAgent ? GUEST_AGENT_MODULES : []), ...(opts.powerButton ? POWER_BUTTON_MODULES : []), ...(opts.extraModules ?? [])]);

  const dirEntry = (name: string): CpioEntry => ({ name, mode: S_IFDIR | 0o755 });
  const entries: CpioEntry[] = [
    ...['bin', 'dev', 'proc', 'sys', 'mnt', 'tmp', 'lib', 'lib/modules'].map(dirEntry),
    { name: 'dev/console', mode: S_IFCHR | 0o600, rdev: { major: 5, minor: 1 } },
    { name: 'dev/null', mode: S_IFCHR | 0o666, rdev: { major: 1, minor: 3 } },
    { name: 'bin/busybox', mode: S_IFREG | 0o755, data: busybox },
    { name: 'bin/sh', mode: S_IFLNK | 0o777, data: Buffer.from('busybox') },
  ];
  for (const m of modules) entries.push({ name: `lib/modules/${m.name}.ko`, mode: S_IFREG | 0o644, data: await moduleBytes(m.path) });
  if (opts.guestAgent) entries.push(...(await guestAgentEntries(opts.guestAgentBinary ?? GUEST_AGENT_BINARY)));
  entries.push({ name: 'init', mode: S_IFREG | 0o755, data: Buffer.from(initScript(modules, opts.guestAgent ?? false, opts.powerButton ?? false)) });

  await mkdir(dir, { recursive: true });
  const out = join(dir, opts.name ?? 'initramfs.cpio.gz');
  await writeFile(out, gzipSync(newcArchive(entries), { level: 6 }));
  return out;
}

// ---------------------------------------------------------------------------------------------
// What the guest does, and what it says

export type GuestAction =
  /** Write `content` to `path` on the guest's disk (parent directories created). */
  | { write: string; content: string | Buffer }
  /** Write `mib` MiB of random data to `path`. */
  | { fill: string; mib: number }
  /** Print the file between CARRYON-READ-BEGIN/END markers (base64). */
  | { read: string }
  /** Print `CARRYON-SHA256 <hex> <path>`. */
  | { sha256: string }
  | { rm: string }
  /**
   * Append numbered records (see `writerRecord`) to `writer`, fdatasync after every `perSync`
   * (default 4) and print `CARRYON-REC n` once 1..n are durable, until the agent's guest-shutdown
   * (an initramfs with `guestAgent`) or the ACPI power button (`powerButton`) asks the guest to
   * stop. Put it last: it runs until then.
   */
  | { writer: string; perSync?: number }
  /**
   * An interactive shell on the terminal `shell` (e.g. /dev/tty1, the VGA console: what a VNC
   * viewer's keystrokes reach), started in the disk's mount point, until the ACPI power button
   * (`powerButton`) or the agent's guest-shutdown. Put it last.
   */
  | { shell: string };

function checkPath(p: string): string {
  if (!/^\/[A-Za-z0-9._\-/+@=,]*$/.test(p)) throw new Error(`guest path must be absolute, without ':' or spaces: ${JSON.stringify(p)}`);
  return p;
}

/**
 * Kernel command-line words for `actions` (run in order by the guest's /init). Text made of
 * safe characters travels as is; anything else as base64. The whole command line is limited to
 * 2048 bytes on x86, so put bigger files in the image with `makeExt4Image`.
 */
export function guestAppend(actions: GuestAction[], opts: { dev?: string; fstype?: string; waitS?: number } = {}): string {
  const words: string[] = [];
  if (opts.dev) words.push(`carryon.dev=${checkPath(opts.dev)}`);
  if (opts.fstype) words.push(`carryon.fstype=${opts.fstype}`);
  if (opts.waitS) words.push(`carryon.wait=${Math.ceil(opts.waitS)}`);
  for (const a of actions) {
    if ('write' in a) {
      const text = typeof a.content === 'string' ? a.content : null;
      if (text !== null && /^[A-Za-z0-9._\-/+@=,:]+$/.test(text)) words.push(`carryon.write=${checkPath(a.write)}:${text}`);
      else words.push(`carryon.write64=${checkPath(a.write)}:${Buffer.from(a.content).toString('base64')}`);
    } else if ('fill' in a) words.push(`carryon.fill=${checkPath(a.fill)}:${Math.floor(a.mib)}`);
    else if ('read' in a) words.push(`carryon.read=${checkPath(a.read)}`);
    else if ('sha256' in a) words.push(`carryon.sha256=${checkPath(a.sha256)}`);
    else if ('shell' in a) words.push(`carryon.shell=${checkPath(a.shell)}`);
    else if ('writer' in a) words.push(`carryon.writer=${checkPath(a.writer)}:${Math.max(1, Math.floor(a.perSync ?? 4))}`);
    else words.push(`carryon.rm=${checkPath(a.rm)}`);
  }
  return words.join(' ');
}

export interface GuestReport {
  /** The guest printed CARRYON-GUEST-DONE: every action succeeded and the disk was unmounted. */
  done: boolean;
  /** The reason after CARRYON-GUEST-FAIL, if the guest failed. */
  failure?: string;
  /** Files printed by `read` actions, by guest path. */
  reads: Map<string, Buffer>;
  /** `sha256` results (hex), by guest path. */
  sha256: Map<string, string>;
  /** The writer's last `CARRYON-REC n` (0 if it wrote nothing durable). */
  durableRecords: number;
  /** The writer stopped (asked to by a guest-shutdown) after this many records. */
  writerStopped?: number;
  /** The guest agent ran in the guest. */
  agentStarted: boolean;
  /** The guest saw its ACPI power button pressed. */
  powerButton: boolean;
  /** Guest uptime (s) when /init started and when it finished, from the markers. */
  uptimeAtInit?: number;
  uptimeAtDone?: number;
}

/** Reads the marker lines out of a guest's serial output (CRLF or LF, kernel noise in between). */
export function parseGuestSerial(serial: string): GuestReport {
  const lines = serial.split(/\r?\n/).map((l) => l.replace(/\r/g, ''));
  const report: GuestReport = { done: false, reads: new Map(), sha256: new Map(), durableRecords: 0, agentStarted: false, powerButton: false };
  let reading: { path: string; b64: string[] } | null = null;
  for (const line of lines) {
    if (reading) {
      if (line === `CARRYON-READ-END ${reading.path}`) {
        report.reads.set(reading.path, Buffer.from(reading.b64.join(''), 'base64'));
        reading = null;
      } else if (/^[A-Za-z0-9+/=]*$/.test(line)) reading.b64.push(line);
      // anything else is a kernel message printed in between
      continue;
    }
    let m: RegExpExecArray | null;
    if ((m = /^CARRYON-READ-BEGIN (.+)$/.exec(line))) reading = { path: m[1]!, b64: [] };
    else if ((m = /^CARRYON-SHA256 ([0-9a-f]{64}) (.+)$/.exec(line))) report.sha256.set(m[2]!, m[1]!);
    else if ((m = /^CARRYON-GUEST-INIT uptime=([\d.]+)/.exec(line))) report.uptimeAtInit = Number(m[1]);
    else if ((m = /^CARRYON-REC (\d+)$/.exec(line))) report.durableRecords = Math.max(report.durableRecords, Number(m[1]));
    else if ((m = /^CARRYON-WRITER-STOP (\d+)$/.exec(line))) report.writerStopped = Number(m[1]);
    else if (line.startsWith(`${GUEST_AGENT_STARTED} `)) report.agentStarted = true;
    else if (line === GUEST_POWER_BUTTON) report.powerButton = true;
    else if ((m = new RegExp(`^${GUEST_DONE} rc=0(?: uptime=([\\d.]+))?`).exec(line))) {
      report.done = true;
      if (m[1]) report.uptimeAtDone = Number(m[1]);
    } else if ((m = new RegExp(`${GUEST_FAIL} (.*)$`).exec(line))) report.failure ??= m[1]!;
  }
  if (report.failure !== undefined) report.done = false;
  return report;
}

// ---------------------------------------------------------------------------------------------
// QEMU

/**
 * What to add to a q35 VM (disk attached as virtio-blk, serial port somewhere readable) to boot
 * the test guest: direct kernel boot, serial console, and QEMU exiting instead of rebooting
 * (panic=-1 turns a guest panic into a reboot, -no-reboot turns that into an exit).
 */
export function guestQemuArgs(opts: { kernel: string; initrd: string; append?: string }): string[] {
  const append = ['console=ttyS0', 'quiet', 'panic=-1', 'mitigations=off', 'i8042.noaux', 'i8042.nokbd', opts.append ?? '']
    .filter(Boolean)
    .join(' ');
  return ['-kernel', opts.kernel, '-initrd', opts.initrd, '-append', append, '-no-reboot'];
}

/**
 * The guest agent's channel for a VM started without `carryon run` (which adds the same itself):
 * QEMU listens on `socket`, the guest sees the port org.qemu.guest_agent.0.
 */
export function guestAgentQemuArgs(socket: string): string[] {
  if (/[,\s]/.test(socket)) throw new Error(`socket path must not contain commas or spaces: ${socket}`);
  return ['-chardev', `socket,id=qga0,path=${socket},server=on,wait=off`, '-device', 'virtio-serial-pci,id=vser0', '-device', `virtserialport,bus=vser0.0,chardev=qga0,name=${GUEST_AGENT_PORT}`];
}

/** QEMU option values escape ',' as ',,'. */
const qemuOpt = (s: string) => s.replace(/,/g, ',,');

/**
 * `-drive` args attaching `file` as the VM's first virtio-blk disk (/dev/vda in the guest).
 * `keySecret` names the secret object (see BootOptions.secrets) of a LUKS-encrypted qcow2.
 */
export function virtioDiskArgs(file: string, format: 'raw' | 'qcow2' = 'raw', opts: { cache?: string; keySecret?: string } = {}): string[] {
  const enc = opts.keySecret ? `,encrypt.key-secret=${opts.keySecret}` : '';
  return ['-drive', `file=${qemuOpt(file)},format=${format},if=virtio,cache=${opts.cache ?? 'writeback'}${enc}`];
}

export interface BootOptions {
  /** QEMU args attaching the disk as virtio-blk, e.g. `virtioDiskArgs(path)` or a `-blockdev` chain. */
  diskArgs: string[];
  /** Default `guestKernel()`. */
  kernel?: string;
  /** Default: built into a temporary directory for this boot. */
  initrd?: string;
  /** Run in order by the guest (see `guestAppend`). */
  actions?: GuestAction[];
  /** More kernel command-line words. */
  append?: string;
  /** Kill QEMU after this long; default 120 s (TCG on a loaded 2-core box). */
  timeoutMs?: number;
  memMiB?: number;
  /** Other QEMU args. */
  extraArgs?: string[];
  /**
   * QEMU secret objects by id (e.g. the LUKS passphrase that `diskArgs` name as
   * `encrypt.key-secret=<id>`), handed over through FIFOs, never argv (see QemuSecrets).
   */
  secrets?: Record<string, string | Buffer>;
  /** Resolve with the report instead of throwing when the guest does not print DONE. */
  allowFailure?: boolean;
}

export interface GuestRun extends GuestReport {
  serial: string;
  /** Host wall-clock seconds from spawning QEMU to its exit. */
  seconds: number;
  exitCode: number | null;
  timedOut: boolean;
}

/**
 * Boots the test guest under QEMU (q35, TCG, no network, serial on stdio), waits for it to power
 * off, and returns its serial output and report. QEMU is killed on timeout and never outlives the
 * call; a temporary initramfs is removed. Throws, with the serial tail, unless the guest printed
 * CARRYON-GUEST-DONE (or `allowFailure`).
 */
export async function bootGuest(opts: BootOptions): Promise<GuestRun> {
  const kernel = opts.kernel ?? guestKernel();
  let tmp: string | null = null;
  let secrets: QemuSecrets | null = null;
  try {
    let initrd = opts.initrd;
    if (!initrd) {
      tmp = await mkdtemp(join(tmpdir(), 'carryon-guest-'));
      initrd = await buildInitramfs(tmp, { kernelRelease: kernelRelease(kernel) });
    }
    const append = [guestAppend(opts.actions ?? []), opts.append ?? ''].filter(Boolean).join(' ');
    const args = [
      '-machine', 'q35',
      '-accel', 'tcg',
      '-cpu', 'max',
      '-smp', '1',
      '-m', String(opts.memMiB ?? 256),
      '-nodefaults', // no VGA, NIC or option ROMs to probe: a faster boot under TCG
      '-no-user-config',
      '-display', 'none',
      '-serial', 'stdio',
      ...guestQemuArgs({ kernel, initrd, append }),
      ...opts.diskArgs,
      ...(opts.extraArgs ?? []),
    ];
    if (opts.secrets) secrets = await QemuSecrets.create(opts.secrets);
    const started = process.hrtime.bigint();
    const child = spawn('qemu-system-x86_64', [...(secrets?.args() ?? []), ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
    // a secret QEMU never reads ends the boot now, with the reason, rather than at the timeout
    let secretError: Error | null = null;
    secrets?.deliver(child).catch((e: Error) => {
      secretError = e;
      child.kill('SIGKILL');
    });
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    child.stdout!.on('data', (b: Buffer) => out.push(b));
    child.stderr!.on('data', (b: Buffer) => err.push(b));
    let timedOut = false;
    let exitCode: number | null = null;
    try {
      exitCode = await new Promise<number | null>((resolve, reject) => {
        const timer = setTimeout(() => {
          timedOut = true;
          child.kill('SIGKILL');
        }, opts.timeoutMs ?? 120_000);
        child.on('error', (e) => {
          clearTimeout(timer);
          reject(new Error(`cannot run qemu-system-x86_64 (install qemu-system-x86): ${e.message}`));
        });
        child.on('close', (code) => {
          clearTimeout(timer);
          resolve(code);
        });
      });
    } finally {
      if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
    }
    const seconds = Number(process.hrtime.bigint() - started) / 1e9;
    const serial = Buffer.concat(out).toString('utf8');
    const result: GuestRun = { ...parseGuestSerial(serial), serial, seconds, exitCode, timedOut };
    if (!result.done && !opts.allowFailure) {
      const why = secretError
        ? (secretError as Error).message
        : timedOut
        ? `timed out after ${(opts.timeoutMs ?? 120_000) / 1000}s`
        : result.failure
          ? `guest failed: ${result.failure}`
          : `QEMU exited ${exitCode} without ${GUEST_DONE}`;
      throw new Error(`${why}\n--- QEMU stderr ---\n${Buffer.concat(err).toString().slice(-2000)}\n--- serial (tail) ---\n${serial.slice(-4000)}`);
    }
    return result;
  } finally {
    await secrets?.close();
    if (tmp) await rm(tmp, { recursive: true, force: true });
  }
}

// ---------------------------------------------------------------------------------------------
// ext4 images (e2fsprogs)

/**
 * Creates (or overwrites) a raw ext4 image of `sizeMiB` at `path`, holding `files` (paths
 * relative to the root, parent directories created). Inode tables and journal are written now,
 * so the guest kernel does not start zeroing them in the background after mounting.
 */
export async function makeExt4Image(path: string, sizeMiB: number, files: Record<string, string | Buffer> = {}): Promise<void> {
  const src = await mkdtemp(join(tmpdir(), 'carryon-ext4-'));
  try {
    for (const [rel, content] of Object.entries(files)) {
      const p = join(src, rel.replace(/^\/+/, ''));
      if (!p.startsWith(src + '/')) throw new Error(`file outside the image: ${rel}`);
      await mkdir(dirname(p), { recursive: true });
      await writeFile(p, content);
    }
    const fh = await open(path, 'w');
    try {
      await fh.truncate(sizeMiB * 2 ** 20);
    } finally {
      await fh.close();
    }
    await run('mkfs.ext4', ['-F', '-q', '-L', 'carryon', '-E', 'lazy_itable_init=0,lazy_journal_init=0,root_owner=0:0', '-d', src, path]).catch(
      (e: Error) => {
        throw new Error(`mkfs.ext4 failed (package e2fsprogs): ${e.message}`);
      },
    );
  } finally {
    await rm(src, { recursive: true, force: true });
  }
}

/** The bytes of `path` inside the raw ext4 image at `imagePath`, read with debugfs (no mount). */
export async function readExt4File(imagePath: string, path: string): Promise<Buffer> {
  if (/["\n\\]/.test(path) || !path.startsWith('/')) throw new Error(`unsupported path for debugfs: ${JSON.stringify(path)}`);
  const { stdout, stderr } = await run('debugfs', ['-R', `cat "${path}"`, imagePath], { encoding: 'buffer', maxBuffer: 1 << 30 });
  // debugfs exits 0 even when the file is missing; anything beyond its banner on stderr is an error
  const problems = stderr
    .toString()
    .split('\n')
    .filter((l) => l.trim() && !/^debugfs \d/.test(l));
  if (problems.length) throw new Error(`debugfs cannot read ${path} in ${imagePath}: ${problems.join('; ')}`);
  return stdout;
}
