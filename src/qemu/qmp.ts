import { connect, type Socket } from 'node:net';

export interface QmpEvent {
  event: string;
  data?: Record<string, unknown>;
}

/** A QMP command that QEMU refused: `class` and `desc` as QEMU reports them. */
export class QmpError extends Error {
  constructor(
    readonly command: string,
    readonly errorClass: string,
    readonly desc: string,
  ) {
    super(`QMP ${command}: ${desc}`);
  }
}

/**
 * QMP client over a unix socket: capabilities handshake, commands answered in order, events
 * kept for `waitEvent`. Used for QEMU (run) and qemu-storage-daemon (serve, fill, merge).
 */
export class QmpConnection {
  private buf = '';
  private waiters: { resolve: (msg: Record<string, unknown>) => void; reject: (err: Error) => void }[] = [];
  private events: QmpEvent[] = [];
  private eventWaiters = new Set<() => void>();
  private readonly listeners: { name: string; fn: (e: QmpEvent) => void }[] = [];
  private closedErr: Error | null = null;

  private constructor(private readonly sock: Socket) {
    sock.setEncoding('utf8');
    sock.on('data', (d: string) => {
      this.buf += d;
      let nl;
      while ((nl = this.buf.indexOf('\n')) >= 0) {
        const line = this.buf.slice(0, nl).trim();
        this.buf = this.buf.slice(nl + 1);
        if (!line) continue;
        let msg: Record<string, unknown>;
        try {
          msg = JSON.parse(line) as Record<string, unknown>;
        } catch {
          continue; // QEMU only sends JSON; anything else is noise we cannot act on
        }
        if ('event' in msg) {
          for (const l of this.listeners) if (l.name === msg.event) l.fn(msg as unknown as QmpEvent);
          this.events.push(msg as unknown as QmpEvent);
          if (this.events.length > 1000) this.events.shift();
          for (const w of this.eventWaiters) w();
        } else this.waiters.shift()?.resolve(msg);
      }
    });
    const gone = () => {
      this.closedErr ??= new Error('QMP connection closed');
      for (const w of this.waiters.splice(0)) w.reject(this.closedErr);
      for (const w of this.eventWaiters) w();
    };
    sock.on('close', gone);
    sock.on('error', (err) => {
      this.closedErr = err;
      gone();
    });
  }

  static async open(path: string): Promise<QmpConnection> {
    const sock = connect(path);
    await new Promise<void>((resolve, reject) => {
      sock.once('connect', resolve);
      sock.once('error', reject);
    });
    const qmp = new QmpConnection(sock);
    await qmp.next(); // greeting
    await qmp.execute('qmp_capabilities');
    return qmp;
  }

  get closed(): boolean {
    return this.closedErr !== null;
  }

  private next(): Promise<Record<string, unknown>> {
    if (this.closedErr) return Promise.reject(this.closedErr);
    return new Promise((resolve, reject) => this.waiters.push({ resolve, reject }));
  }

  async execute(command: string, args?: Record<string, unknown>): Promise<unknown> {
    const reply = this.next();
    this.sock.write(`${JSON.stringify(args ? { execute: command, arguments: args } : { execute: command })}\n`);
    const msg = await reply;
    if ('error' in msg) {
      const e = msg.error as { class?: string; desc?: string };
      throw new QmpError(command, e.class ?? 'GenericError', e.desc ?? JSON.stringify(msg.error));
    }
    return msg.return;
  }

  /** Calls `fn` with every `name` event from now on (as it arrives; `waitEvent` still sees it). */
  onEvent(name: string, fn: (e: QmpEvent) => void): void {
    this.listeners.push({ name, fn });
  }

  sawEvent(name: string): boolean {
    return this.events.some((e) => e.event === name);
  }

  /** Resolves with the first event (seen already or arriving) that `match` accepts; rejects on close or timeout. */
  waitEvent(match: (e: QmpEvent) => boolean, timeoutMs: number): Promise<QmpEvent> {
    return new Promise((resolve, reject) => {
      let timer: NodeJS.Timeout | undefined;
      const check = () => {
        const hit = this.events.find(match);
        if (hit) {
          this.events.splice(this.events.indexOf(hit), 1);
          done();
          resolve(hit);
        } else if (this.closedErr) {
          done();
          reject(this.closedErr);
        }
      };
      const done = () => {
        this.eventWaiters.delete(check);
        if (timer) clearTimeout(timer);
      };
      timer = setTimeout(() => {
        done();
        reject(new Error(`no matching QMP event within ${timeoutMs} ms`));
      }, timeoutMs);
      this.eventWaiters.add(check);
      check();
    });
  }

  close(): void {
    this.sock.destroy();
  }
}
