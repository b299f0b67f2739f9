import { connect, type Socket } from 'node:net';
import { CarryonError } from '../core/errors.js';
import { CMD, encodeRequest, FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES, IHAVEOPT, INFO, MAX_PAYLOAD, NBDMAGIC, OPT, OPT_REPLY_MAGIC, REP, SIMPLE_REPLY_MAGIC } from './protocol.js';
import { ByteQueue, SocketReader } from './reader.js';

export class NbdClientError extends CarryonError {
  constructor(message: string) {
    super('nbd-client', message);
  }
}

interface Pending {
  length: number;
  resolve: (data: Buffer) => void;
  reject: (err: Error) => void;
}

/** Socket reads outside a read reply's payload (headers, acks, a payload's first bytes). */
const SCRATCH = 16 * 1024;

/**
 * Chooses where each socket read lands: straight into the buffer of the read reply being
 * received (no copy, no per-read allocation: a check-in reads every changed chunk this way),
 * else a small scratch area whose bytes are copied out to `sink`.
 */
class Receiver {
  private readonly scratch = Buffer.allocUnsafe(SCRATCH);
  private handed: Buffer = this.scratch;
  private target: { buf: Buffer; at: number; done: (b: Buffer) => void } | null = null;
  sink: (piece: Buffer) => void = () => undefined;

  /** The next read's buffer (net's `onread.buffer`, asked again after every read). */
  readonly next = (): Buffer => (this.handed = this.target ? this.target.buf.subarray(this.target.at) : this.scratch);

  /** net's `onread.callback`: `n` bytes landed in the buffer `next` gave. */
  readonly onRead = (n: number): boolean => {
    const t = this.target;
    if (this.handed === this.scratch || !t) {
      this.sink(Buffer.from(this.scratch.subarray(0, n)));
      return true;
    }
    t.at += n;
    if (t.at === t.buf.length) {
      this.target = null;
      t.done(t.buf);
    }
    return true;
  };

  /** Receives the rest of a payload into `buf` (its first `have` bytes are already there). */
  fill(buf: Buffer, have: number, done: (b: Buffer) => void): void {
    this.target = { buf, at: have, done };
  }

  abandon(): void {
    this.target = null;
  }
}

/**
 * A small NBD client (fixed newstyle, NBD_OPT_GO, simple replies, pipelined requests) for reading
 * and writing a chain that qemu-storage-daemon exports on a private unix socket.
 */
export class NbdClient {
  /** Received bytes not yet consumed: a list of pieces, joined only when one reply is whole. */
  private received = new ByteQueue();
  private pending = new Map<bigint, Pending>();
  private nextHandle = 1n;
  private current: { handle: bigint; p: Pending } | null = null;
  private failed: Error | null = null;

  private constructor(
    private readonly sock: Socket,
    private readonly receiver: Receiver,
    readonly size: number,
    readonly readOnly: boolean,
  ) {
    receiver.sink = (d) => this.onData(d);
    const fail = (err: Error) => {
      this.failed ??= err;
      for (const p of this.pending.values()) p.reject(this.failed);
      this.pending.clear();
      this.current?.p.reject(this.failed);
      this.current = null;
      this.receiver.abandon();
    };
    sock.on('error', fail);
    sock.on('close', () => fail(new NbdClientError('NBD server closed the connection')));
  }

  static async connect(socketPath: string, exportName: string): Promise<NbdClient> {
    const receiver = new Receiver();
    const sock = connect({ path: socketPath, onread: { buffer: receiver.next, callback: receiver.onRead } });
    const reader = new SocketReader(sock, () => new NbdClientError('NBD server closed the connection during the handshake'));
    receiver.sink = (d) => reader.feed(d);
    await new Promise<void>((resolve, reject) => {
      sock.once('connect', resolve);
      sock.once('error', reject);
    });
    const hello = await reader.read(18);
    if (hello.readBigUInt64BE(0) !== NBDMAGIC || hello.readBigUInt64BE(8) !== IHAVEOPT) throw new NbdClientError('not an NBD newstyle server');
    if (!(hello.readUInt16BE(16) & FLAG_FIXED_NEWSTYLE)) throw new NbdClientError('NBD server lacks fixed newstyle');
    const flags = Buffer.alloc(4);
    flags.writeUInt32BE(FLAG_FIXED_NEWSTYLE | (hello.readUInt16BE(16) & FLAG_NO_ZEROES));
    const name = Buffer.from(exportName, 'utf8');
    const data = Buffer.alloc(4 + name.length + 2);
    data.writeUInt32BE(name.length, 0);
    name.copy(data, 4);
    const opt = Buffer.alloc(16);
    opt.writeBigUInt64BE(IHAVEOPT, 0);
    opt.writeUInt32BE(OPT.GO, 8);
    opt.writeUInt32BE(data.length, 12);
    sock.write(Buffer.concat([flags, opt, data]));
    let size = -1;
    let tflags = 0;
    for (let i = 0; i < 64; i++) {
      const h = await reader.read(20);
      if (h.readBigUInt64BE(0) !== OPT_REPLY_MAGIC) throw new NbdClientError('bad option reply');
      const type = h.readUInt32BE(12);
      const body = await reader.read(h.readUInt32BE(16));
      if (type === REP.ACK) break;
      if (type === REP.INFO && body.readUInt16BE(0) === INFO.EXPORT) {
        size = Number(body.readBigUInt64BE(2));
        tflags = body.readUInt16BE(10);
      } else if (type & 0x80000000) {
        throw new NbdClientError(`NBD server refused export "${exportName}": ${body.toString('utf8') || type.toString(16)}`);
      }
    }
    if (size < 0) throw new NbdClientError('NBD server sent no export size');
    const rest = reader.detach();
    const client = new NbdClient(sock, receiver, size, Boolean(tflags & 2));
    if (rest.length) client.onData(rest.take(rest.length));
    return client;
  }

  read(offset: number, length: number): Promise<Buffer> {
    return this.request(CMD.READ, offset, length);
  }

  async write(offset: number, data: Buffer): Promise<void> {
    await this.request(CMD.WRITE, offset, data.length, data);
  }

  async flush(): Promise<void> {
    await this.request(CMD.FLUSH, 0, 0);
  }

  /** Zeros `length` bytes at `offset` (the server may punch them: a layer over a backing marks them zero). */
  async writeZeroes(offset: number, length: number): Promise<void> {
    await this.request(CMD.WRITE_ZEROES, offset, length);
  }

  /** Discards `length` bytes at `offset` (a guest's TRIM). */
  async trim(offset: number, length: number): Promise<void> {
    await this.request(CMD.TRIM, offset, length);
  }

  async close(): Promise<void> {
    if (!this.failed) {
      this.sock.write(encodeRequest({ type: CMD.DISC, handle: 0n, offset: 0, length: 0 }));
      this.failed = new NbdClientError('closed');
    }
    this.sock.end();
    this.sock.destroy();
  }

  private request(type: number, offset: number, length: number, payload?: Buffer): Promise<Buffer> {
    if (this.failed) return Promise.reject(this.failed);
    if (length > MAX_PAYLOAD) return Promise.reject(new NbdClientError(`request of ${length} bytes exceeds ${MAX_PAYLOAD}`));
    if (offset < 0 || offset + length > this.size) return Promise.reject(new NbdClientError(`range ${offset}+${length} is outside the ${this.size}-byte export`));
    const handle = this.nextHandle++;
    return new Promise((resolve, reject) => {
      this.pending.set(handle, { length: type === CMD.READ ? length : 0, resolve, reject });
      if (!payload) {
        this.sock.write(encodeRequest({ type, handle, offset, length }));
        return;
      }
      // Corked: header and payload leave in one writev, without copying the payload.
      this.sock.cork();
      this.sock.write(encodeRequest({ type, handle, offset, length }));
      this.sock.write(payload);
      this.sock.uncork();
    });
  }

  private onData(d: Buffer): void {
    this.received.push(d);
    for (;;) {
      if (!this.current) {
        if (this.received.length < 16) return;
        const head = this.received.take(16);
        if (head.readUInt32BE(0) !== SIMPLE_REPLY_MAGIC) {
          this.sock.destroy(new NbdClientError('bad NBD reply magic'));
          return;
        }
        const error = head.readUInt32BE(4);
        const handle = head.readBigUInt64BE(8);
        const p = this.pending.get(handle);
        if (!p) {
          this.sock.destroy(new NbdClientError('NBD reply for an unknown request'));
          return;
        }
        this.pending.delete(handle);
        if (error !== 0) {
          p.reject(new NbdClientError(`NBD server answered error ${error}${ERRNO_TEXT[error] ? ` (${ERRNO_TEXT[error]})` : ''}`));
          continue;
        }
        if (p.length === 0) {
          p.resolve(Buffer.alloc(0));
          continue;
        }
        this.current = { handle, p };
      }
      const { p } = this.current;
      if (this.received.length < p.length) {
        // The rest of the payload is read straight into the caller's buffer.
        const buf = Buffer.allocUnsafe(p.length);
        const have = this.received.length;
        if (have) this.received.take(have).copy(buf);
        this.receiver.fill(buf, have, (data) => {
          this.current = null;
          p.resolve(data);
        });
        return;
      }
      // Pieces are copies of the scratch area: a view of them is the caller's to keep.
      p.resolve(this.received.take(p.length));
      this.current = null;
    }
  }
}

/** What the NBD errors mean (a full disk must read as one to the caller). */
const ERRNO_TEXT: Record<number, string> = { 1: 'EPERM: not permitted', 5: 'EIO: I/O error', 12: 'ENOMEM', 22: 'EINVAL: invalid request', 28: 'ENOSPC: No space left on device', 95: 'ENOTSUP' };
