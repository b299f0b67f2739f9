import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { existsSync } from 'node:fs';
import { chmod, mkdir, readdir, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { promisify } from 'node:util';

// A private CUPS (Debian package cups) stands in for the laptop's print system: its own cupsd on
// a unix socket in a temp directory (no TCP port, never the system's /run/cups/cups.sock or its
// printcap), one queue that prints to /dev/null and keeps each job's document in its spool, so a
// test sees exactly the bytes a job carried.
const run = promisify(execFile);

export const CUPSD = '/usr/sbin/cupsd';
export const cupsSkip = existsSync(CUPSD) && existsSync('/usr/sbin/lpadmin') ? false : 'CUPS is not installed (Debian packages cups, cups-client); scripts/install-deps installs them';

export interface PrivateCups {
  /** The socket to point CUPS_SERVER at (what `carryon run` relays the guest's printer to). */
  socket: string;
  /** The queue's name: ipp://<host>/printers/<queue>. */
  queue: string;
  /** Jobs CUPS took, oldest first: id, requesting user and the document's bytes. */
  jobs(): Promise<{ id: number; user: string; document: Buffer }[]>;
  stop(): Promise<void>;
}

/** Starts cupsd on `<dir>/cups.sock` with one raw queue named `queue` (CUPS 2.4 still takes raw queues, with a warning). */
export async function startCups(dir: string, queue = 'carryon'): Promise<PrivateCups> {
  const conf = join(dir, 'conf');
  for (const d of ['conf', 'spool', 'cache', 'state', 'tmp', 'log']) await mkdir(join(dir, d), { recursive: true });
  await chmod(dir, 0o755); // cupsd's children run as lp and look up the spool under it
  const socket = join(dir, 'cups.sock');
  // Anyone on the socket may print (the relay is the only client); no web interface, no browsing, no TCP.
  await writeFile(join(conf, 'cupsd.conf'), [
    `Listen ${socket}`, 'LogLevel info', 'WebInterface No', 'Browsing No', 'DefaultAuthType None', 'PreserveJobFiles Yes', 'PreserveJobHistory Yes',
    '<Location />', '  Order allow,deny', '  Allow all', '</Location>',
    '<Policy default>', '  <Limit All>', '    Order deny,allow', '  </Limit>', '</Policy>', '',
  ].join('\n'));
  await writeFile(join(conf, 'cups-files.conf'), [
    `ServerRoot ${conf}`, `RequestRoot ${join(dir, 'spool')}`, `CacheDir ${join(dir, 'cache')}`, `StateDir ${join(dir, 'state')}`,
    `TempDir ${join(dir, 'tmp')}`, `ErrorLog ${join(dir, 'log', 'error_log')}`, `AccessLog ${join(dir, 'log', 'access_log')}`,
    `PageLog ${join(dir, 'log', 'page_log')}`, `Printcap ${join(dir, 'state', 'printcap')}`, 'FileDevice Yes', 'Sandboxing Relaxed', '',
  ].join('\n'));
  const child: ChildProcess = spawn(CUPSD, ['-f', '-c', join(conf, 'cupsd.conf'), '-s', join(conf, 'cups-files.conf')], { stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  child.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
  const exited = new Promise<void>((r) => child.once('exit', () => r()));
  const log = async () => `${stderr}${await readFile(join(dir, 'log', 'error_log'), 'utf8').catch(() => '')}`.slice(-2000);
  const stop = async () => {
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGTERM');
    await exited;
  };
  try {
    for (let i = 0; !existsSync(socket); i++) {
      if (child.exitCode !== null || i > 100) throw new Error(`cupsd did not start (its socket ${socket} never appeared): ${await log()}`);
      await new Promise((r) => setTimeout(r, 100));
    }
    await run('lpadmin', ['-h', socket, '-p', queue, '-E', '-v', 'file:///dev/null']);
  } catch (err) {
    await stop();
    throw err;
  }
  return {
    socket,
    queue,
    async jobs() {
      // lpstat's `-W all -o` lines: "<queue>-<id> <user> <size> <date>"; PreserveJobFiles keeps d<id>-001.
      const { stdout } = await run('lpstat', ['-h', socket, '-W', 'all', '-o', queue]);
      const spool = await readdir(join(dir, 'spool')).catch(() => [] as string[]);
      const out = [];
      for (const line of stdout.split('\n')) {
        const m = new RegExp(`^${queue}-(\\d+)\\s+(\\S+)`).exec(line);
        if (!m) continue;
        const id = Number(m[1]);
        const doc = spool.find((f) => f === `d${String(id).padStart(5, '0')}-001`);
        out.push({ id, user: m[2]!, document: doc ? await readFile(join(dir, 'spool', doc)) : Buffer.alloc(0) });
      }
      return out.sort((a, b) => a.id - b.id);
    },
    stop,
  };
}

/**
 * A binary IPP/1.1 Print-Job request (RFC 8010) for `printerUri` carrying `document`: what an IPP
 * client sends, built here so that a guest without one can print with `wget --post-file`.
 */
export function ippPrintJob(printerUri: string, document: Buffer, opts: { user?: string; jobName?: string; format?: string; requestId?: number } = {}): Buffer {
  const parts: Buffer[] = [Buffer.from([1, 1, 0x00, 0x02]), u32(opts.requestId ?? 1), Buffer.from([0x01])];
  const attr = (tag: number, name: string, value: string) => {
    const n = Buffer.from(name, 'utf8');
    const v = Buffer.from(value, 'utf8');
    parts.push(Buffer.from([tag]), u16(n.length), n, u16(v.length), v);
  };
  attr(0x47, 'attributes-charset', 'utf-8');
  attr(0x48, 'attributes-natural-language', 'en');
  attr(0x45, 'printer-uri', printerUri);
  attr(0x42, 'requesting-user-name', opts.user ?? 'guest');
  attr(0x42, 'job-name', opts.jobName ?? 'carryon-test-page');
  attr(0x49, 'document-format', opts.format ?? 'application/octet-stream');
  parts.push(Buffer.from([0x03]), document);
  return Buffer.concat(parts);
}

const u16 = (n: number) => {
  const b = Buffer.alloc(2);
  b.writeUInt16BE(n);
  return b;
};
const u32 = (n: number) => {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(n);
  return b;
};

/**
 * The whole HTTP request that carries an IPP request to `path` on the guest's printer address,
 * for a guest that sends it with busybox nc (busybox wget's --post-file stops at the first NUL
 * byte, and IPP is binary).
 */
export function ippHttpRequest(host: string, path: string, ipp: Buffer): Buffer {
  return Buffer.concat([Buffer.from(`POST ${path} HTTP/1.1\r\nHost: ${host}\r\nContent-Type: application/ipp\r\nContent-Length: ${ipp.length}\r\nConnection: close\r\n\r\n`, 'latin1'), ipp]);
}

/** From an HTTP answer to an IPP request: the HTTP status and the IPP status code (0 = successful-ok), or null where there is none. */
export function ippAnswer(answer: Buffer): { http: number | null; ipp: number | null } {
  const http = /^HTTP\/1\.[01] (\d{3})/.exec(answer.toString('latin1', 0, 16));
  const at = answer.indexOf('\r\n\r\n');
  const body = at < 0 ? Buffer.alloc(0) : answer.subarray(at + 4);
  return { http: http ? Number(http[1]) : null, ipp: http?.[1] === '200' && body.length >= 4 ? body.readUInt16BE(2) : null };
}
