import { spawn, execFile } from 'node:child_process';
import { constants as fsConstants } from 'node:fs';
import { access, open, stat } from 'node:fs/promises';
import { promisify } from 'node:util';
import { CarryonError, ValidationError } from '../core/errors.js';

const run = promisify(execFile);

export type ImageFormat = 'raw' | 'qcow2' | 'vmdk' | 'vdi';
export const IMAGE_FORMATS: readonly ImageFormat[] = ['raw', 'qcow2', 'vmdk', 'vdi'];

/** A disk image as a stream of its raw (guest-visible) bytes. */
export interface ImageSource {
  format: ImageFormat;
  size: number;
  stream: AsyncIterable<Buffer>;
  /** A raw image file that sealing workers may read by range themselves (instead of `stream`). */
  file?: string;
  close(): void;
}

export class ImageNotFoundError extends CarryonError {
  constructor(path: string) {
    super('not-found', `image ${path} does not exist or is not a regular file`);
  }
}

async function requireFile(path: string): Promise<number> {
  try {
    const st = await stat(path);
    if (!st.isFile() && !st.isBlockDevice()) throw new ImageNotFoundError(path);
    return st.size;
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') throw new ImageNotFoundError(path);
    throw err;
  }
}

/** The parts of `qemu-img info --output=json` (QEMU 7.2) that say what an image is and what it reads. */
interface QemuImageInfo {
  format?: string;
  filename?: string;
  'virtual-size'?: number;
  'actual-size'?: number;
  'backing-filename'?: string;
  'full-backing-filename'?: string;
  'format-specific'?: { type?: string; data?: { 'data-file'?: string; 'create-type'?: string; extents?: { filename?: string }[] } };
}

/**
 * Every file besides itself whose bytes the image would show the guest: a backing file (a path or
 * a `json:` spec), a qcow2 external data file, a VMDK extent in another file. QEMU follows all of
 * them, so an image inside `--import-dir` (or an upload) could import any file the broker can read.
 * `qemu-img info` opens the image without its backing chain, so asking is itself safe.
 */
function namedFiles(info: QemuImageInfo): string[] {
  const found: string[] = [];
  const backing = info['backing-filename'] ?? info['full-backing-filename'];
  if (backing !== undefined) found.push(`backing file ${backing}`);
  const data = info['format-specific']?.data;
  if (data?.['data-file'] !== undefined) found.push(`external data file ${data['data-file']}`);
  for (const extent of data?.extents ?? []) {
    if (extent.filename !== info.filename) found.push(`extent ${extent.filename ?? '(unnamed)'}`);
  }
  return found;
}

/** Format and virtual size as QEMU sees them; an image that reads other files is refused. */
export async function inspectImage(path: string): Promise<{ format: string; virtualSize: number; actualSize: number }> {
  await requireFile(path);
  let out: string;
  try {
    out = (await run('qemu-img', ['info', '--output=json', path], { maxBuffer: 16 << 20 })).stdout;
  } catch (err) {
    const e = err as NodeJS.ErrnoException & { stderr?: string };
    if (e.code === 'ENOENT') throw new CarryonError('missing-tool', 'qemu-img is not installed (Debian package qemu-utils)');
    throw new CarryonError('bad-image', `qemu-img cannot read ${path}: ${(e.stderr ?? e.message).trim()}`);
  }
  const info = JSON.parse(out) as QemuImageInfo;
  if (typeof info.format !== 'string' || typeof info['virtual-size'] !== 'number') {
    throw new CarryonError('bad-image', `qemu-img gave no format/size for ${path}`);
  }
  const outside = namedFiles(info);
  if (outside.length > 0) {
    throw new CarryonError('image-names-other-files', `${path} reads other files (${outside.join('; ')}): only self-contained images are imported; flatten it first (qemu-img convert -O qcow2 ${path} flat.qcow2)`);
  }
  return { format: info.format, virtualSize: info['virtual-size'], actualSize: info['actual-size'] ?? 0 };
}

/**
 * `qemu-img check` (metadata only, fast) before streaming: QEMU reads clusters that lie past the
 * end of a truncated image as zeros, so a cut-short copy would otherwise import "successfully"
 * with data silently missing. Leaked clusters (exit 3) are harmless; 63 = no check for the format.
 */
async function checkImage(path: string, fmt: ImageFormat): Promise<void> {
  const res = await new Promise<{ code: number | null; stdout: string }>((resolve) => {
    execFile('qemu-img', ['check', '--output=json', '-f', fmt, path], { maxBuffer: 64 << 20 }, (err, stdout) =>
      resolve({ code: err ? ((err as { code?: number }).code ?? 1) : 0, stdout }),
    );
  });
  if (res.code === 0 || res.code === 3 || res.code === 63) return;
  let detail = `qemu-img check exited with ${res.code}`;
  try {
    const j = JSON.parse(res.stdout) as { corruptions?: number; 'check-errors'?: number };
    detail = `${j.corruptions ?? 0} corrupt clusters, ${j['check-errors'] ?? 0} check errors (truncated or damaged image?)`;
  } catch {
    // no JSON: keep the exit code
  }
  throw new CarryonError('bad-image', `${path} fails qemu-img check: ${detail}`);
}

export async function detectFormat(path: string): Promise<ImageFormat> {
  const { format } = await inspectImage(path);
  if (!(IMAGE_FORMATS as readonly string[]).includes(format)) {
    throw new ValidationError(`image format ${format} is not supported (supported: ${IMAGE_FORMATS.join(', ')})`);
  }
  return format as ImageFormat;
}

/** Raw file: whole `readSize` pieces, each in its own ArrayBuffer (transferable to a worker). */
async function rawSource(path: string, size: number, readSize: number): Promise<ImageSource> {
  await access(path, fsConstants.R_OK);
  let closed = false;
  // Opened only when streamed: importers that read ranges themselves (`file`) never open it here.
  async function* stream(): AsyncGenerator<Buffer> {
    const fh = await open(path, 'r');
    try {
      for (let pos = 0; pos < size && !closed; ) {
        const buf = Buffer.from(new ArrayBuffer(Math.min(readSize, size - pos)));
        let got = 0;
        while (got < buf.length) {
          const { bytesRead } = await fh.read(buf, got, buf.length - got, pos + got);
          if (bytesRead === 0) throw new CarryonError('bad-image', `${path} ended at ${pos + got} bytes, expected ${size}`);
          got += bytesRead;
        }
        pos += got;
        yield buf;
      }
    } finally {
      await fh.close();
    }
  }
  return { format: 'raw', size, stream: stream(), file: path, close: () => void (closed = true) };
}

/**
 * Opens an image for streaming. Raw files are read directly; other formats are decoded by
 * qemu-nbd and streamed by nbdcopy to a pipe, so no full temporary copy is ever written.
 */
export async function openImageSource(path: string, format: ImageFormat | 'auto', readSize: number): Promise<ImageSource> {
  const fileSize = await requireFile(path);
  const fmt = format === 'auto' ? await detectFormat(path) : format;
  if (!IMAGE_FORMATS.includes(fmt)) throw new ValidationError(`image format ${String(fmt)} is not supported`);
  if (fmt === 'raw') return rawSource(path, fileSize, readSize);
  const { virtualSize, format: actual } = await inspectImage(path);
  if (actual !== fmt) throw new ValidationError(`image ${path} is ${actual}, not ${fmt}`);
  await checkImage(path, fmt);
  // `backing: null` as well (inspectImage refused backing files): a file swapped in between the two
  // looks still finds no backing chain to follow.
  const spec = { driver: fmt, backing: null, file: { driver: (await stat(path)).isBlockDevice() ? 'host_device' : 'file', filename: path } };
  const child = spawn('nbdcopy', ['--', '[', 'qemu-nbd', '-r', `json:${JSON.stringify(spec)}`, ']', '-'], {
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let stderr = '';
  child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
  const exited = new Promise<void>((resolve, reject) => {
    child.on('error', (err: NodeJS.ErrnoException) =>
      reject(err.code === 'ENOENT' ? new CarryonError('missing-tool', 'nbdcopy is not installed (Debian package libnbd-bin)') : err),
    );
    child.on('close', (code, signal) =>
      code === 0 ? resolve() : reject(new CarryonError('bad-image', `nbdcopy failed (${code ?? signal}) on ${path}: ${stderr.trim()}`)),
    );
  });
  exited.catch(() => undefined);
  async function* stream(): AsyncGenerator<Buffer> {
    for await (const piece of child.stdout) yield piece as Buffer;
    await exited;
  }
  return { format: fmt, size: virtualSize, stream: stream(), close: () => child.kill('SIGTERM') };
}
