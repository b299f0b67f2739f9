import { Transform, type TransformCallback } from 'node:stream';

/**
 * The guest's HTTP requests to its printer (IPP is HTTP POST), with each request's Host header
 * made `localhost`. CUPS answers a connection on its unix socket (a local one) only for a
 * loopback Host, so the guest's `Host: 10.0.2.100:631` would get 400 Bad Request for every job.
 * Requests are followed one after another on a kept-alive connection: the head is rewritten, the
 * body (Content-Length or chunked) passes through unchanged. An Upgrade (to TLS) is dropped: the
 * path is a pipe inside this laptop, and after one the stream could no longer be followed. A head
 * that is not HTTP/1.x, not a POST to a print resource, or too long, or an IPP operation that is
 * not printing (PRINT_OPERATIONS), ends the connection before any of that request reaches CUPS.
 */
export const MAX_HEAD_BYTES = 64 * 1024;
/** IPP's resources for printing: the server (CUPS-Get-Printers), a printer or class, a job. */
const PRINT_TARGET = /^\/((printers|classes|jobs)\/[A-Za-z0-9_.@%+-]*)?$/;

/**
 * IPP operations a guest may send: printing, and asking about printers and its jobs (RFC 8011;
 * CUPS-Get-Default, -Get-Printers, -Get-Classes). Not the printer's administration (Pause-Printer,
 * Purge-Jobs, CUPS-Add-Modify-Printer…), which CUPS would take from the relay as this laptop's user.
 */
export const PRINT_OPERATIONS: ReadonlySet<number> = new Set([0x0002, 0x0004, 0x0005, 0x0006, 0x0008, 0x0009, 0x000a, 0x000b, 0x003b, 0x4001, 0x4002, 0x4005]);

type State = { at: 'head' } | { at: 'body'; left: number } | { at: 'chunk-size' } | { at: 'chunk-data'; left: number } | { at: 'trailer' };

export class LocalHostRewriter extends Transform {
  private state: State = { at: 'head' };
  private pending: Buffer = Buffer.alloc(0);
  /** While a request's IPP operation is not known yet: what would have gone out, held back. */
  private held: Buffer[] | null = null;
  /** The first body bytes of the request being checked (version, operation). */
  private prefix: Buffer = Buffer.alloc(0);

  override _transform(chunk: Buffer, _enc: BufferEncoding, done: TransformCallback): void {
    this.pending = this.pending.length ? Buffer.concat([this.pending, chunk]) : chunk;
    try {
      while (this.pending.length > 0 && this.step());
      done();
    } catch (err) {
      done(err as Error);
    }
  }

  /** One step of the request stream; false when more bytes are needed. */
  private step(): boolean {
    const s = this.state;
    if (s.at === 'body' || s.at === 'chunk-data') {
      // While the operation is not known, only as far as its 4 bytes (a chunk's CRLF is not body).
      const bodyLeft = s.at === 'chunk-data' ? s.left - 2 : s.left;
      const n = Math.min(this.held && bodyLeft > 0 ? Math.min(bodyLeft, 4 - this.prefix.length) : s.left, this.pending.length);
      if (this.held && bodyLeft > 0) this.prefix = Buffer.concat([this.prefix, this.pending.subarray(0, n)]);
      this.pass(n);
      s.left -= n;
      if (this.held && this.prefix.length === 4) this.checkOperation();
      if (s.left === 0) {
        this.state = s.at === 'body' ? { at: 'head' } : { at: 'chunk-size' };
        if (this.held && s.at === 'body') throw new Error('an IPP request shorter than its header');
      }
      return true;
    }
    const end = this.pending.indexOf(s.at === 'head' ? '\r\n\r\n' : '\r\n');
    if (end < 0) {
      if (this.pending.length > MAX_HEAD_BYTES) throw new Error('an HTTP head or chunk line that never ends');
      return false;
    }
    if (s.at === 'chunk-size') {
      const line = this.pending.toString('latin1', 0, end);
      const size = parseInt(line.split(';')[0]!.trim(), 16);
      if (!/^[0-9a-fA-F]+/.test(line.trim()) || !Number.isSafeInteger(size)) throw new Error(`bad chunk size line ${JSON.stringify(line.slice(0, 40))}`);
      this.pass(end + 2);
      // Each chunk's data ends with CRLF; the last (size 0) is followed by trailers and an empty line.
      if (size === 0 && this.held) throw new Error('an IPP request shorter than its header');
      this.state = size === 0 ? { at: 'trailer' } : { at: 'chunk-data', left: size + 2 };
      return true;
    }
    if (s.at === 'trailer') {
      const last = end === 0;
      this.pass(end + 2);
      if (last) this.state = { at: 'head' };
      return true;
    }
    // A request head: rewrite it, then follow its body.
    const lines = this.pending.toString('latin1', 0, end).split('\r\n');
    this.pending = this.pending.subarray(end + 4);
    const requestLine = lines.shift() ?? '';
    if (!/^[A-Z]+ \S+ HTTP\/1\.[01]$/.test(requestLine)) throw new Error(`not an HTTP/1.x request: ${JSON.stringify(requestLine.slice(0, 60))}`);
    // Printing only: CUPS takes the relay's requests as this laptop's user's own (peer credentials
    // on its socket), so its admin pages and config (/admin, PUT of cupsd.conf) stay out of reach.
    const [method, target] = requestLine.split(' ');
    if (method !== 'POST' || !PRINT_TARGET.test(target!)) throw new Error(`not a print request: ${JSON.stringify(requestLine.slice(0, 60))}`);
    const kept = lines.filter((l) => !/^(host|upgrade)\s*:/i.test(l));
    const header = (name: string) => lines.find((l) => l.toLowerCase().startsWith(`${name}:`))?.slice(name.length + 1).trim();
    // Held back until the body's first 4 bytes name an operation the guest may send.
    this.held = [];
    this.prefix = Buffer.alloc(0);
    this.out(Buffer.from([requestLine, 'Host: localhost', ...kept, '', ''].join('\r\n'), 'latin1'));
    if (/chunked/i.test(header('transfer-encoding') ?? '')) this.state = { at: 'chunk-size' };
    else {
      const length = Number(header('content-length') ?? 0);
      if (!Number.isSafeInteger(length) || length < 4) throw new Error('an IPP request without its header (Content-Length under 4)');
      this.state = { at: 'body', left: length };
    }
    return true;
  }

  private checkOperation(): void {
    const op = this.prefix.readUInt16BE(2);
    if (!PRINT_OPERATIONS.has(op)) throw new Error(`IPP operation 0x${op.toString(16).padStart(4, '0')} is not a print operation`);
    for (const b of this.held ?? []) this.push(b);
    this.held = null;
  }

  private out(b: Buffer): void {
    if (this.held) this.held.push(b);
    else this.push(b);
  }

  private pass(n: number): void {
    this.out(this.pending.subarray(0, n));
    this.pending = this.pending.subarray(n);
  }
}
