import binding from 'zstd-napi/binding.js';

/**
 * zstd decompression that never makes more than a known bound. zstd-napi's `decompress` trusts
 * the frame: it allocates whatever size the header declares, or, without one, grows until the
 * input ends, so ≈ 8 KiB of RLE blocks asked for 256 MiB (issue 22). Here the frame must be one
 * frame (all our sealers write one) that declares its content size (they all do), at most `max`;
 * it is decompressed in one shot into exactly that many bytes, and zstd stops with an error the
 * moment a block would write past them (a header that lies gains nothing).
 */
export class DecompressRefused extends Error {
  constructor(
    readonly reason: 'too-large' | 'decompress',
    message: string,
  ) {
    super(message);
  }
}

/** One context per thread (worker threads load their own copy of this module). */
let dctx: binding.DCtx | null = null;

/** `into`: where to write when it has room (a recycled buffer; the result is a view of it), else a new buffer. */
export function decompressBounded(frame: Uint8Array, max: number, into?: Buffer): Buffer {
  let size: number | null;
  let length: number;
  try {
    size = binding.getFrameContentSize(frame);
    length = binding.findFrameCompressedSize(frame);
  } catch (err) {
    throw new DecompressRefused('decompress', `not one whole zstd frame (${(err as Error).message})`);
  }
  if (size === null) throw new DecompressRefused('decompress', 'the zstd frame does not declare its size');
  if (size > max) throw new DecompressRefused('too-large', `the zstd frame declares ${size} bytes (at most ${max} here)`);
  if (length !== frame.length) throw new DecompressRefused('decompress', `${frame.length - length} bytes after the zstd frame`);
  const out = into && into.length >= size ? into.subarray(0, size) : Buffer.allocUnsafe(size);
  let made: number;
  try {
    dctx ??= new binding.DCtx();
    made = dctx.decompress(out, frame);
  } catch (err) {
    throw new DecompressRefused('decompress', (err as Error).message);
  }
  if (made !== size) throw new DecompressRefused('decompress', `the zstd frame declares ${size} bytes and holds ${made}`);
  return out;
}
