/**
 * The disk benchmark's measuring side and its peer (issue 10): any NBD URI is measured the same
 * way, with fio (4 KiB random read/write at QD1 and QD16) and nbdcopy (sequential throughput),
 * and the peer is what a QEMU user would run instead of Carryon: qemu-nbd serving a standalone
 * LUKS-encrypted qcow2 of the same image.
 *
 * Peer settings (what `qemu-nbd`/`qemu-system` do when not told otherwise): cache=writeback,
 * aio=threads, qcow2 defaults (64 KiB clusters), LUKS aes-256-xts-plain64 with a sha256 PBKDF2.
 * `cache: 'none'` with `aio: 'native'` (libvirt's usual production pick) is one option away.
 */
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { open, mkdtemp, rm, stat } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { QemuSecrets } from '../test/support/qemu-secret.js';
import { peerEnv } from './lib/measure.js';
import type { BenchRow } from './types.js';

const run = promisify(execFile);
const MB = 1e6;

// ---------------------------------------------------------------------------------------------
// The peer: a standalone LUKS qcow2, served by qemu-nbd

export interface LuksOptions {
  /** The LUKS passphrase (text). A bench can use `randomBytes(32).toString('hex')`. */
  secret: string;
  /**
   * PBKDF2 time QEMU calibrates for the key slot, ms. The secret here is random, not a
   * password, so stretching buys nothing; a short time keeps each open (qemu-nbd start) fast.
   */
  iterTimeMs?: number;
  /** qcow2 `extended_l2=on` (4 KiB subclusters), as the laptop's top layer will use; default off. */
  extendedL2?: boolean;
}

/**
 * Copies the raw image `src` into a new standalone LUKS-encrypted qcow2 at `dst`
 * (`qemu-img convert`, secret through a FIFO). QEMU's PBKDF2 calibration sometimes fails with
 * "Unable to get accurate CPU usage" on a busy machine; that case is retried.
 */
export async function createLuksQcow2(src: string, dst: string, opts: LuksOptions): Promise<void> {
  const o = ['encrypt.format=luks', 'encrypt.key-secret=sec0', `encrypt.iter-time=${opts.iterTimeMs ?? 200}`];
  if (opts.extendedL2) o.push('extended_l2=on');
  for (let attempt = 1; ; attempt++) {
    try {
      await runWithSecrets('qemu-img', (secretArgs) => ['convert', '-f', 'raw', '-O', 'qcow2', ...secretArgs, '-o', o.join(','), src, dst], {
        sec0: opts.secret,
      });
      return;
    } catch (e) {
      if (attempt < 9 && /accurate CPU usage/.test((e as Error).message)) continue;
      throw e;
    }
  }
}

/** Decrypts the LUKS qcow2 `src` into the raw image `dst` (e.g. to inspect it with debugfs). */
export async function luksQcow2ToRaw(src: string, dst: string, secret: string): Promise<void> {
  const opts = `driver=qcow2,encrypt.key-secret=sec0,file.driver=file,file.filename=${src.replace(/,/g, ',,')}`;
  await runWithSecrets('qemu-img', (secretArgs) => ['convert', ...secretArgs, '--image-opts', opts, '-O', 'raw', dst], { sec0: secret });
}

/** Runs a QEMU tool to completion with secrets handed over through FIFOs. */
async function runWithSecrets(cmd: string, args: (secretArgs: string[]) => string[], secrets: Record<string, string>): Promise<void> {
  const s = await QemuSecrets.create(secrets);
  let child: ChildProcess | null = null;
  try {
    child = spawn(cmd, args(s.args()), { stdio: ['ignore', 'ignore', 'pipe'] });
    const err: Buffer[] = [];
    child.stderr!.on('data', (b: Buffer) => err.push(b));
    const exited = new Promise<number | null>((resolve, reject) => {
      child!.on('error', reject);
      child!.on('close', resolve);
    });
    const delivered = s.deliver(child).catch((e: Error) => e);
    const code = await exited;
    const deliverError = await delivered;
    if (code !== 0) throw new Error(`${cmd} failed (${code}): ${Buffer.concat(err).toString().trim()}`);
    if (deliverError) throw deliverError;
  } finally {
    if (child && child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
    await s.close();
  }
}

export interface NbdPeer {
  /** `nbd+unix:///disk0?socket=…` */
  uri: string;
  socket: string;
  /** Stops qemu-nbd (and waits for it). */
  close(): Promise<void>;
}

export interface ServeOptions {
  secret: string;
  /** Default writeback (QEMU's default); 'none' is O_DIRECT, as libvirt usually configures. */
  cache?: 'writeback' | 'none' | 'writethrough' | 'directsync' | 'unsafe';
  /** Default threads (QEMU's default); 'native' needs cache=none. */
  aio?: 'threads' | 'native' | 'io_uring';
  exportName?: string;
}

/** Waits until `uri` answers NBD (nbdinfo), or throws if `child` exits first. */
async function waitForNbd(uri: string, child: ChildProcess, stderr: () => string, timeoutMs = 60_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    if (child.exitCode !== null || child.signalCode !== null) throw new Error(`qemu-nbd exited: ${stderr()}`);
    try {
      await run('nbdinfo', ['--size', uri]);
      return;
    } catch {
      if (Date.now() > deadline) throw new Error(`${uri} did not come up within ${timeoutMs / 1000}s: ${stderr()}`);
      await new Promise((r) => setTimeout(r, 50));
    }
  }
}

/**
 * Serves the LUKS qcow2 `image` with qemu-nbd on the unix socket `socket` (persistent, up to 16
 * clients, writable, discard=unmap), returning once it answers NBD.
 */
export async function serveLuksQcow2(image: string, socket: string, opts: ServeOptions): Promise<NbdPeer> {
  const name = opts.exportName ?? 'disk0';
  const cache = opts.cache ?? 'writeback';
  const aio = opts.aio ?? 'threads';
  const secrets = await QemuSecrets.create({ sec0: opts.secret });
  const err: Buffer[] = [];
  let child: ChildProcess | null = null;
  try {
    const q = (s: string) => s.replace(/,/g, ',,');
    child = spawn(
      'qemu-nbd',
      [
        ...secrets.args(),
        '--image-opts', `driver=qcow2,encrypt.key-secret=sec0,file.driver=file,file.filename=${q(image)}`,
        `--cache=${cache}`, `--aio=${aio}`, '--discard=unmap',
        '--persistent', '--shared=16', '--export-name', name,
        '--socket', socket,
      ],
      { stdio: ['ignore', 'ignore', 'pipe'], env: peerEnv() },
    );
    child.stderr!.on('data', (b: Buffer) => err.push(b));
    const spawned = child;
    const spawnError = new Promise<never>((_, reject) => spawned.on('error', (e) => reject(new Error(`cannot run qemu-nbd (install qemu-utils): ${e.message}`))));
    const uri = `nbd+unix:///${name}?socket=${socket}`;
    await Promise.race([
      (async () => {
        await secrets.deliver(spawned);
        await waitForNbd(uri, spawned, () => Buffer.concat(err).toString().trim());
      })(),
      spawnError,
    ]);
    const exited = new Promise<void>((r) => (spawned.exitCode !== null || spawned.signalCode !== null ? r() : spawned.once('close', () => r())));
    child = null; // from here on the caller owns it through close()
    return {
      uri,
      socket,
      async close() {
        if (spawned.exitCode === null && spawned.signalCode === null) spawned.kill('SIGTERM');
        const killer = setTimeout(() => spawned.kill('SIGKILL'), 10_000);
        await exited;
        clearTimeout(killer);
        await rm(socket, { force: true });
      },
    };
  } finally {
    if (child && child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
    await secrets.close();
  }
}

/**
 * The whole peer: a LUKS qcow2 of the raw `image` in a temporary directory, served by qemu-nbd;
 * `fn` gets its URI and the qcow2's path. Everything is stopped and removed afterwards.
 */
export async function withLuksPeer<T>(
  image: string,
  fn: (peer: { uri: string; qcow2: string }) => Promise<T>,
  opts: Partial<ServeOptions & LuksOptions> & { workDir?: string } = {},
): Promise<T> {
  const dir = await mkdtemp(join(opts.workDir ?? tmpdir(), 'carryon-peer-'));
  let peer: NbdPeer | null = null;
  try {
    const secret = opts.secret ?? randomBytes(32).toString('hex');
    const qcow2 = join(dir, 'peer.qcow2');
    await createLuksQcow2(image, qcow2, { ...opts, secret });
    peer = await serveLuksQcow2(qcow2, join(dir, 'nbd.sock'), { ...opts, secret });
    return await fn({ uri: peer.uri, qcow2 });
  } finally {
    await peer?.close();
    await rm(dir, { recursive: true, force: true });
  }
}

// ---------------------------------------------------------------------------------------------
// Measuring any NBD URI

export interface FioResult {
  rw: 'randread' | 'randwrite';
  iodepth: number;
  iops: number;
  /** 99th percentile of total latency (submission to completion), microseconds. */
  p99Us: number;
  meanUs: number;
  /** Bytes moved during the measured time. */
  bytes: number;
  seconds: number;
}

/** fio's JSON, the parts we read (shape of fio 3.x `--output-format=json`). */
interface FioJson {
  jobs: Array<{
    error: number;
    read: FioSide;
    write: FioSide;
  }>;
}
interface FioSide {
  io_bytes: number;
  iops: number;
  runtime: number; // ms
  lat_ns?: { mean: number; percentile?: Record<string, number> };
  clat_ns?: { mean: number; percentile?: Record<string, number> };
}

/** Extracts IOPS and latency from fio's JSON output (one job, group reporting). */
export function parseFio(json: string, rw: 'randread' | 'randwrite', iodepth: number): FioResult {
  // fio may print notes before the JSON document
  const doc = JSON.parse(json.slice(json.indexOf('{'))) as FioJson;
  const job = doc.jobs[0];
  if (!job) throw new Error('fio reported no job');
  if (job.error) throw new Error(`fio job failed with error ${job.error}`);
  const side = rw === 'randread' ? job.read : job.write;
  const lat = side.lat_ns?.percentile ? side.lat_ns : side.clat_ns;
  const p99 = lat?.percentile?.['99.000000'];
  if (p99 === undefined || !lat) throw new Error('fio output has no 99th percentile latency');
  return { rw, iodepth, iops: side.iops, p99Us: p99 / 1000, meanUs: lat.mean / 1000, bytes: side.io_bytes, seconds: side.runtime / 1000 };
}

export interface FioOptions {
  /** Measured seconds per run; default 10. */
  runtimeS?: number;
  /** Unmeasured seconds first; default 1. */
  rampS?: number;
  /** Send a flush every N writes (a guest's fsyncs); default none. */
  flushEvery?: number;
}

/** One fio run of 4 KiB random I/O against an NBD URI (libnbd engine, one connection). */
export async function fioNbd(uri: string, rw: 'randread' | 'randwrite', iodepth: number, opts: FioOptions = {}): Promise<FioResult> {
  const args = [
    '--name=carryon-disk', '--ioengine=nbd', `--uri=${uri}`,
    `--rw=${rw}`, '--bs=4k', `--iodepth=${iodepth}`,
    '--time_based', `--runtime=${opts.runtimeS ?? 10}`, `--ramp_time=${opts.rampS ?? 1}`,
    '--norandommap', '--randrepeat=0', '--lat_percentiles=1',
    '--output-format=json',
  ];
  if (opts.flushEvery) args.push(`--fsync=${opts.flushEvery}`);
  const { stdout } = await run('fio', args, { maxBuffer: 64 << 20 }).catch((e: Error & { stderr?: string }) => {
    throw new Error(`fio ${rw} QD${iodepth} on ${uri} failed: ${e.stderr?.trim() || e.message}`);
  });
  return parseFio(stdout, rw, iodepth);
}

/** Size of an NBD export in bytes. */
export async function nbdSize(uri: string): Promise<number> {
  const { stdout } = await run('nbdinfo', ['--size', uri]);
  return Number(stdout.trim());
}

async function randomFile(path: string, bytes: number): Promise<void> {
  const fh = await open(path, 'w');
  try {
    for (let off = 0; off < bytes; off += 1 << 20) {
      const n = Math.min(1 << 20, bytes - off);
      await fh.write(randomBytes(n), 0, n, off);
    }
  } finally {
    await fh.close();
  }
}

export interface SeqResult {
  readMBs: number;
  writeMBs: number;
  bytes: number;
}

/**
 * Sequential throughput with nbdcopy over the whole export: read to `null:`, then write a file of
 * random data (incompressible, no zeros) with a final flush. `--no-extents` makes nbdcopy move
 * every byte instead of skipping what block status reports as holes or zeros.
 */
export async function nbdcopyThroughput(uri: string, opts: { workDir?: string } = {}): Promise<SeqResult> {
  const bytes = await nbdSize(uri);
  const dir = await mkdtemp(join(opts.workDir ?? tmpdir(), 'carryon-seq-'));
  try {
    const src = join(dir, 'src.raw');
    await randomFile(src, bytes);
    await run('sync');
    const timed = async (args: string[]) => {
      const t = process.hrtime.bigint();
      await run('nbdcopy', args);
      return Number(process.hrtime.bigint() - t) / 1e9;
    };
    const readS = await timed(['--no-extents', uri, 'null:']);
    const writeS = await timed(['--no-extents', '--flush', src, uri]);
    return { readMBs: bytes / readS / MB, writeMBs: bytes / writeS / MB, bytes };
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

export interface DiskMeasurement {
  uri: string;
  sizeBytes: number;
  randread: { qd1: FioResult; qd16: FioResult };
  randwrite: { qd1: FioResult; qd16: FioResult };
  seq: SeqResult;
}

/**
 * Everything issue 10 compares, against one NBD URI: fio 4 KiB randread and randwrite at QD1 and
 * QD16 (time-based), then nbdcopy sequential read and write. Writes change the export's data.
 */
export async function measureNbdDisk(uri: string, opts: FioOptions & { workDir?: string } = {}): Promise<DiskMeasurement> {
  const sizeBytes = await nbdSize(uri);
  const rr1 = await fioNbd(uri, 'randread', 1, opts);
  const rr16 = await fioNbd(uri, 'randread', 16, opts);
  const rw1 = await fioNbd(uri, 'randwrite', 1, opts);
  const rw16 = await fioNbd(uri, 'randwrite', 16, opts);
  const seq = await nbdcopyThroughput(uri, opts);
  return { uri, sizeBytes, randread: { qd1: rr1, qd16: rr16 }, randwrite: { qd1: rw1, qd16: rw16 }, seq };
}

export interface GrowthRun {
  /** Bytes the writes carried (fio's count); compare with how much the backing files grew. */
  bytesWritten: number;
  seconds: number;
  iops: number;
  /** False when `maxSeconds` cut the run short of `multiple` × the disk size. */
  complete: boolean;
}

/**
 * "Vault growth" load: random 4 KiB writes totalling `multiple` (default 4) × the export's size,
 * at QD16, offsets drawn with repeats (rewrites are the point), a flush every `flushEvery`
 * (default 32) writes as a guest's journal would. The caller measures its files before and after.
 */
export async function randomRewrites(uri: string, opts: { multiple?: number; flushEvery?: number; maxSeconds?: number } = {}): Promise<GrowthRun> {
  const size = await nbdSize(uri);
  const total = Math.floor((size * (opts.multiple ?? 4)) / 4096) * 4096;
  const args = [
    '--name=carryon-growth', '--ioengine=nbd', `--uri=${uri}`,
    '--rw=randwrite', '--bs=4k', '--iodepth=16', `--io_size=${total}`,
    '--norandommap', '--randrepeat=0', `--fsync=${opts.flushEvery ?? 32}`,
    '--output-format=json',
  ];
  if (opts.maxSeconds) args.push(`--runtime=${opts.maxSeconds}`);
  const { stdout } = await run('fio', args, { maxBuffer: 64 << 20 });
  const r = parseFio(stdout, 'randwrite', 16);
  return { bytesWritten: r.bytes, seconds: r.seconds, iops: r.iops, complete: r.bytes >= total };
}

/** Apparent size and bytes allocated on the host of a file (st_blocks × 512). */
export async function fileUsage(path: string): Promise<{ apparent: number; allocated: number }> {
  const s = await stat(path);
  return { apparent: s.size, allocated: s.blocks * 512 };
}

// ---------------------------------------------------------------------------------------------
// Rows for BENCHMARKS.md

/**
 * Table rows judging `ours` against `peer` (same image, same run) by issue 10's targets:
 * IOPS ≥ 0.9× and p99 ≤ 1.5× the peer's, sequential MB/s ≥ 0.9×. One run each (spread 0).
 */
export function diskRows(section: string, ours: DiskMeasurement, peer: DiskMeasurement, peerName: string): BenchRow[] {
  const rows: BenchRow[] = [];
  const ratio = (a: number, b: number) => (b ? a / b : 0);
  for (const rw of ['randread', 'randwrite'] as const) {
    for (const qd of ['qd1', 'qd16'] as const) {
      const o = ours[rw][qd];
      const p = peer[rw][qd];
      const label = `4 KiB ${rw === 'randread' ? 'random read' : 'random write'}, QD${o.iodepth}`;
      const r = ratio(o.iops, p.iops);
      rows.push({ section, name: `${label}: IOPS`, value: o.iops, unit: 'IOPS', runs: 1, spread: 0, peer: { name: peerName, value: p.iops, unit: 'IOPS' }, note: `${r.toFixed(2)}× (goal ≥ 0.9×)${r >= 0.9 ? '' : ' MISSED'}` });
      const l = ratio(o.p99Us, p.p99Us);
      rows.push({ section, name: `${label}: p99 latency`, value: o.p99Us / 1000, unit: 'ms', runs: 1, spread: 0, peer: { name: peerName, value: p.p99Us / 1000, unit: 'ms' }, note: `${l.toFixed(2)}× (goal ≤ 1.5×)${l <= 1.5 ? '' : ' MISSED'}` });
    }
  }
  for (const [key, name] of [['readMBs', 'sequential read (nbdcopy)'], ['writeMBs', 'sequential write (nbdcopy, flush)']] as const) {
    const r = ratio(ours.seq[key], peer.seq[key]);
    rows.push({ section, name, value: ours.seq[key], unit: 'MB/s', runs: 1, spread: 0, peer: { name: peerName, value: peer.seq[key], unit: 'MB/s' }, note: `${r.toFixed(2)}× (goal ≥ 0.9×)${r >= 0.9 ? '' : ' MISSED'}` });
  }
  return rows;
}
