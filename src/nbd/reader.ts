import type { Socket } from 'node:net';

/** Received bytes not yet consumed: a list of pieces, joined only when a read spans several. */
export class ByteQueue {
  private pieces: Buffer[] = [];
  private have = 0;

  get length(): number {
    return this.have;
  }

  push(d: Buffer): void {
    this.pieces.push(d);
    this.have += d.length;
  }

  /** The next `n` bytes (at most `length`), as one buffer: a view when they lie in one piece, a copy otherwise. */
  take(n: number): Buffer {
    if (n === 0) return Buffer.alloc(0);
    const first = this.pieces[0]!;
    let out: Buffer;
    if (first.length >= n) {
      out = first.subarray(0, n);
      if (first.length === n) this.pieces.shift();
      else this.pieces[0] = first.subarray(n);
    } else {
      out = Buffer.allocUnsafe(n);
      let at = 0;
      while (at < n) {
        const p = this.pieces[0]!;
        const k = Math.min(p.length, n - at);
        p.copy(out, at, 0, k);
        at += k;
        if (k === p.length) this.pieces.shift();
        else this.pieces[0] = p.subarray(k);
      }
    }
    this.have -= n;
    return out;
  }
}

/**
 * Buffered exact reads from a socket (the NBD server's whole conversation, the client's
 * handshake); rejects once the peer is gone and what it sent is used up: with the socket's own
 * error, or `closed()` when it simply went away.
 */
export class SocketReader {
  private queue = new ByteQueue();
  private waiter: (() => void) | null = null;
  private ended: Error | null = null;
  private readonly listeners: [string, (arg?: unknown) => void][];

  constructor(private readonly socket: Socket, closed: () => Error) {
    const wake = () => this.waiter?.();
    this.listeners = [
      ['data', (d) => this.feed(d as Buffer)],
      ['error', (e) => ((this.ended ??= e as Error), wake())],
      ['end', () => ((this.ended ??= closed()), wake())],
      ['close', () => ((this.ended ??= closed()), wake())],
    ];
    for (const [event, fn] of this.listeners) socket.on(event, fn);
  }

  /** Bytes received another way than 'data' events (a socket read into buffers of its owner's choosing). */
  feed(d: Buffer): void {
    this.queue.push(d);
    this.waiter?.();
  }

  async read(n: number): Promise<Buffer> {
    while (this.queue.length < n) {
      if (this.ended) throw this.ended;
      await new Promise<void>((r) => (this.waiter = r));
      this.waiter = null;
    }
    return this.queue.take(n);
  }

  /** Stops listening; returns what arrived but was not read, for whoever reads the socket next. */
  detach(): ByteQueue {
    for (const [event, fn] of this.listeners) this.socket.removeListener(event, fn);
    return this.queue;
  }
}
