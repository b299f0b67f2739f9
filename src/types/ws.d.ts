/**
 * The few parts of `ws` (a dependency of @fastify/websocket, without its own types here) that the
 * display relay uses: the broker's sockets come from @fastify/websocket, the host's from here.
 */
declare module 'ws' {
  import type { EventEmitter } from 'node:events';
  import type { ClientRequestArgs, IncomingMessage } from 'node:http';
  import type { Duplex } from 'node:stream';

  namespace WebSocket {
    type RawData = Buffer | ArrayBuffer | Buffer[];
    interface ClientOptions {
      headers?: Record<string, string>;
      maxPayload?: number;
      perMessageDeflate?: boolean;
      handshakeTimeout?: number;
      createConnection?: ClientRequestArgs['createConnection'];
    }
  }
  class WebSocket extends EventEmitter {
    static readonly CONNECTING: 0;
    static readonly OPEN: 1;
    static readonly CLOSING: 2;
    static readonly CLOSED: 3;
    constructor(address: string, options?: WebSocket.ClientOptions);
    constructor(address: string, protocols?: string | string[], options?: WebSocket.ClientOptions);
    readonly readyState: 0 | 1 | 2 | 3;
    readonly bufferedAmount: number;
    readonly protocol: string;
    readonly isPaused: boolean;
    binaryType: 'nodebuffer' | 'arraybuffer' | 'fragments';
    send(data: Buffer | ArrayBuffer | string, options?: { binary?: boolean }, cb?: (err?: Error) => void): void;
    send(data: Buffer | ArrayBuffer | string, cb?: (err?: Error) => void): void;
    close(code?: number, reason?: string): void;
    terminate(): void;
    pause(): void;
    resume(): void;
    on(event: 'message', listener: (data: WebSocket.RawData, isBinary: boolean) => void): this;
    on(event: 'close', listener: (code: number, reason: Buffer) => void): this;
    on(event: 'error', listener: (err: Error) => void): this;
    on(event: 'open', listener: () => void): this;
    on(event: 'unexpected-response', listener: (req: unknown, res: IncomingMessage) => void): this;
    on(event: string, listener: (...args: unknown[]) => void): this;
    once(event: 'close', listener: (code: number, reason: Buffer) => void): this;
    once(event: 'open', listener: () => void): this;
    once(event: 'error', listener: (err: Error) => void): this;
    once(event: 'unexpected-response', listener: (req: unknown, res: IncomingMessage) => void): this;
    once(event: string, listener: (...args: unknown[]) => void): this;
  }
  export { WebSocket, type Duplex };
  export default WebSocket;
}
