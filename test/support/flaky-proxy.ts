import { createServer, request, type IncomingMessage, type Server } from 'node:http';

/**
 * An HTTP proxy on 127.0.0.1 in front of a real server that answers 503 (or drops the
 * connection) for the requests `fail` picks: transient faults for testing retries.
 */
export async function flakyProxy(target: string, fail: (req: IncomingMessage, n: number) => 'ok' | '503' | 'reset'): Promise<{ url: string; seen: number; failed: number; close(): Promise<void> }> {
  const t = new URL(target);
  const state = { seen: 0, failed: 0 };
  const server: Server = createServer((req, res) => {
    const verdict = fail(req, state.seen++);
    if (verdict !== 'ok') {
      state.failed++;
      req.resume();
      if (verdict === 'reset') return void req.socket.destroy();
      res.writeHead(503, { 'content-type': 'application/xml', connection: 'close' });
      return void res.end('<?xml version="1.0" encoding="UTF-8"?><Error><Code>ServiceUnavailable</Code><Message>injected</Message></Error>');
    }
    const up = request({ host: t.hostname, port: t.port, method: req.method, path: req.url, headers: req.headers }, (r) => {
      res.writeHead(r.statusCode ?? 502, r.headers);
      r.pipe(res);
    });
    up.on('error', () => res.destroy());
    req.pipe(up);
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  const addr = server.address();
  const port = typeof addr === 'object' && addr ? addr.port : 0;
  return {
    url: `http://127.0.0.1:${port}`,
    get seen() { return state.seen; },
    get failed() { return state.failed; },
    close: () => new Promise<void>((r) => { server.closeAllConnections(); server.close(() => r()); }),
  };
}
