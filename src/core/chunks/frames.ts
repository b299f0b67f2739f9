import { chunkIdFromBytes, chunkIdToBytes, type ChunkId } from '../chunk-id.js';
import { BLOB_OVERHEAD, MAX_BLOB_SIZE } from './blob.js';
import { MAX_DELTA_BODY } from './delta.js';
import { MAX_DELTA_CHAIN, MAX_DELTA_RECORD } from './delta-record.js';
import { CarryonError } from '../errors.js';

/** Framed chunk stream: type u8 ‖ id 32 ‖ length u32be ‖ payload. */
export const FRAME_END = 0;
/** A stored chunk as the server sends it (fetch); never accepted by a push. */
export const FRAME_BLOB = 1;
export const FRAME_ERROR = 2;
// Type 3 was a changed chunk named by its sender (a delta against a base chunk); retired with the
// named push (architecture decision 53) and now refused as an unknown type.
/**
 * A changed chunk the sender does not name (core/delta pages blob): the header's ID field holds
 * the base chunk's ID (all zeros: none), payload = tag u32be ‖ pages blob. The receiver names the
 * rebuilt chunk in its answer, by tag.
 */
export const FRAME_PAGES = 4;
/**
 * A chunk sent as the pages that make it from a base the receiver said it holds (fetch with
 * `have`): header ID = the chunk's, payload = a delta record (core/chunks/delta-record.ts).
 */
export const FRAME_DELTA = 5;
/** The same for a copy parked further back: header ID = the chunk's, payload = a chain of records (delta-record.ts). */
export const FRAME_DELTA_CHAIN = 6;
const MAX_PAGES_FRAME = 4 + MAX_DELTA_BODY + BLOB_OVERHEAD;
const HEAD = 1 + 32 + 4;
const MAX_ERROR_PAYLOAD = 4096;

export type Frame =
  | { type: typeof FRAME_BLOB; id: ChunkId; payload: Buffer }
  | { type: typeof FRAME_DELTA; id: ChunkId; payload: Buffer }
  | { type: typeof FRAME_DELTA_CHAIN; id: ChunkId; payload: Buffer }
  | { type: typeof FRAME_PAGES; baseId: ChunkId | null; tag: number; payload: Buffer }
  | { type: typeof FRAME_ERROR; id: ChunkId; message: string }
  | { type: typeof FRAME_END };

const MAX_PAYLOAD: Record<number, number> = {
  [FRAME_END]: 0,
  [FRAME_BLOB]: MAX_BLOB_SIZE,
  [FRAME_ERROR]: MAX_ERROR_PAYLOAD,
  [FRAME_PAGES]: MAX_PAGES_FRAME,
  [FRAME_DELTA]: MAX_DELTA_RECORD,
  [FRAME_DELTA_CHAIN]: MAX_DELTA_CHAIN,
};
const NO_ID = Buffer.alloc(32);

export class FrameError extends CarryonError {
  constructor(message: string) {
    super('bad-frame', message);
  }
}

/** A frame's header alone: for a sender that writes the payload after it without joining them. */
export function frameHeader(type: number, id: ChunkId | null, payloadLength: number, into = Buffer.allocUnsafe(HEAD)): Buffer {
  into[0] = type;
  if (id) chunkIdToBytes(id).copy(into, 1);
  else into.fill(0, 1, 33);
  into.writeUInt32BE(payloadLength, 33);
  return into.subarray(0, HEAD);
}

export function encodeFrame(type: number, id: ChunkId | null, payload: Uint8Array = Buffer.alloc(0)): Buffer {
  const out = Buffer.allocUnsafe(HEAD + payload.length);
  frameHeader(type, id, payload.length, out);
  Buffer.from(payload.buffer, payload.byteOffset, payload.byteLength).copy(out, HEAD);
  return out;
}

export const endFrame = (): Buffer => encodeFrame(FRAME_END, null);
export const blobFrame = (id: ChunkId, blob: Uint8Array): Buffer => encodeFrame(FRAME_BLOB, id, blob);
/** Header and tag of a pages frame; the pages blob follows it on the wire (not joined: no copy). */
export function pagesFrameHead(tag: number, baseId: ChunkId | null, blobLength: number): Buffer {
  const head = Buffer.allocUnsafe(HEAD + 4);
  frameHeader(FRAME_PAGES, baseId, 4 + blobLength, head);
  head.writeUInt32BE(tag, HEAD);
  return head;
}
export const errorFrame = (id: ChunkId, message: string): Buffer =>
  encodeFrame(FRAME_ERROR, id, Buffer.from(message.slice(0, MAX_ERROR_PAYLOAD)));

/**
 * Incremental decoder: feed arbitrary pieces, get whole validated frames. Rejects unknown
 * types, oversize lengths, data after the end frame, and (at finish) a stream cut short.
 */
export class FrameDecoder {
  /** Received, not yet decoded; joined only when a frame is complete (one copy per frame at most). */
  private pieces: Buffer[] = [];
  private size = 0;
  private ended = false;
  /** With `reuse`: the buffer frames that span pieces are joined into. */
  private joined = Buffer.alloc(0);

  /**
   * `reuse`: a frame that spans pieces is joined into one buffer the decoder keeps, instead of a
   * new one per frame (a chunk-sized allocation is an mmap and its page faults every time), so a
   * frame's payload is valid only until the next `push`: for a consumer done with each frame
   * before it reads on. At most one frame per push is joined (the piece just pushed completes it).
   */
  constructor(private readonly opts: { reuse?: boolean } = {}) {}

  push(piece: Uint8Array): Frame[] {
    if (this.ended && piece.length) throw new FrameError('data after the end frame');
    if (piece.length) {
      this.pieces.push(Buffer.isBuffer(piece) ? piece : Buffer.from(piece.buffer, piece.byteOffset, piece.byteLength));
      this.size += piece.length;
    }
    const frames: Frame[] = [];
    while (this.size >= HEAD) {
      const head = this.peek(HEAD);
      const type = head[0]!;
      const len = head.readUInt32BE(33);
      const max = MAX_PAYLOAD[type];
      if (max === undefined) throw new FrameError(`unknown frame type ${type}`);
      if (len > max) throw new FrameError(`frame of type ${type} claims ${len} bytes (max ${max})`);
      if (this.size < HEAD + len) break;
      const whole = this.take(HEAD + len);
      const payload = whole.subarray(HEAD);
      if (type === FRAME_END) {
        this.ended = true;
        if (this.size) throw new FrameError('data after the end frame');
        frames.push({ type: FRAME_END });
        break;
      }
      if (type === FRAME_PAGES) {
        if (len < 4) throw new FrameError('pages frame without a tag');
        const rawBase = whole.subarray(1, 33);
        frames.push({ type, baseId: rawBase.equals(NO_ID) ? null : chunkIdFromBytes(rawBase), tag: payload.readUInt32BE(0), payload: payload.subarray(4) });
        continue;
      }
      const id = chunkIdFromBytes(whole.subarray(1, 33));
      if (type === FRAME_BLOB || type === FRAME_DELTA || type === FRAME_DELTA_CHAIN) frames.push({ type, id, payload });
      else frames.push({ type: FRAME_ERROR, id, message: payload.toString('utf8') });
    }
    return frames;
  }

  /** The first `n` buffered bytes as one buffer (joins only the pieces needed). */
  private peek(n: number): Buffer {
    if (this.pieces[0]!.length < n) {
      let k = 0;
      for (let got = 0; got < n; k++) got += this.pieces[k]!.length;
      this.pieces.splice(0, k, Buffer.concat(this.pieces.slice(0, k)));
    }
    return this.pieces[0]!;
  }

  /** Removes and returns the first `n` buffered bytes. */
  private take(n: number): Buffer {
    if (this.opts.reuse && this.pieces[0]!.length < n) return this.join(n);
    const first = this.peek(n);
    const out = first.subarray(0, n);
    if (first.length === n) this.pieces.shift();
    else this.pieces[0] = first.subarray(n);
    this.size -= n;
    return out;
  }

  /** `take` for `reuse`: the first `n` bytes copied into the decoder's own buffer. */
  private join(n: number): Buffer {
    if (this.joined.length < n) this.joined = Buffer.allocUnsafeSlow(Math.max(n, MAX_BLOB_SIZE + HEAD));
    let got = 0;
    let used = 0;
    while (got < n) {
      const p = this.pieces[used]!;
      const k = Math.min(p.length, n - got);
      p.copy(this.joined, got, 0, k);
      got += k;
      if (k === p.length) used++;
      else this.pieces[used] = p.subarray(k);
    }
    this.pieces.splice(0, used);
    this.size -= n;
    return this.joined.subarray(0, n);
  }

  /** Call at end of input: throws unless the end frame arrived. */
  finish(): void {
    if (!this.ended) throw new FrameError(this.size ? 'stream cut inside a frame' : 'stream ended without an end frame');
  }
}
