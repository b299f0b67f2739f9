import { chmod, rm } from 'node:fs/promises';
import { createServer, type Server, type Socket } from 'node:net';
import { dirname } from 'node:path';
import { DiskError, type BlockDevice } from '../disk/block-device.js';
import { ensurePrivateDir } from '../net/private-dir.js';
import {
  blockSizeInfo, CMD, CMD_FLAG_FUA, ERR, exportInfo, exportNameReply, FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES, IHAVEOPT, MAX_OPTION,
  MAX_PAYLOAD, OPT, optionReply, parseGoData, parseRequest, REP, serverHello, serverListEntry, simpleReply, transmissionFlags,
} from './protocol.js';
import { SocketReader } from './reader.js';

class ProtocolError extends Error {}

export interface NbdServer {
  address: string;
  close(): Promise<void>;
}

/**
 * NBD server (newstyle fixed handshake) over named block devices: on a unix socket (0600, made
 * inside a 0700 directory of this user's) by default, or TCP on 127.0.0.1 when asked. A malformed or vanished client
 * costs its own connection only.
 */
export async function serveNbd(exports: Map<string, BlockDevice>, where: { socketPath: string } | { tcpPort: number }): Promise<NbdServer> {
  const sockets = new Set<Socket>();
  const server: Server = createServer((socket) => {
    sockets.add(socket);
    socket.on('close', () => sockets.delete(socket));
    socket.setNoDelay(true);
    handle(socket, exports).catch(() => undefined).finally(() => socket.destroy());
  });
  server.on('error', () => undefined);
  let address: string;
  if ('socketPath' in where) {
    // Private from its creation: made inside a 0700 directory of ours (an existing one is
    // tightened, a foreign one refused); the chmod after listen is a second fence only.
    await ensurePrivateDir(dirname(where.socketPath));
    await rm(where.socketPath, { force: true });
    await new Promise<void>((resolve, reject) => server.listen(where.socketPath, resolve).once('error', reject));
    await chmod(where.socketPath, 0o600);
    address = where.socketPath;
  } else {
    await new Promise<void>((resolve, reject) => server.listen(where.tcpPort, '127.0.0.1', resolve).once('error', reject));
    const a = server.address();
    address = `127.0.0.1:${typeof a === 'object' && a ? a.port : where.tcpPort}`;
  }
  return {
    address,
    close: async () => {
      for (const s of sockets) s.destroy();
      await new Promise<void>((r) => server.close(() => r()));
      for (const dev of exports.values()) await dev.flush().catch(() => undefined);
    },
  };
}

async function handle(socket: Socket, exports: Map<string, BlockDevice>): Promise<void> {
  const rd = new SocketReader(socket, () => new ProtocolError('peer closed the connection'));
  socket.write(serverHello());
  const clientFlags = (await rd.read(4)).readUInt32BE(0);
  if (clientFlags & ~(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)) throw new ProtocolError('unknown client flags');
  const noZeroes = (clientFlags & FLAG_NO_ZEROES) !== 0;

  let device: BlockDevice | undefined;
  while (!device) {
    const head = await rd.read(16);
    if (head.readBigUInt64BE(0) !== IHAVEOPT) throw new ProtocolError('bad option magic');
    const option = head.readUInt32BE(8);
    const len = head.readUInt32BE(12);
    if (len > MAX_OPTION) throw new ProtocolError('option too large');
    const data = await rd.read(len);
    switch (option) {
      case OPT.EXPORT_NAME: {
        device = exports.get(data.toString('utf8')) ?? (data.length === 0 && exports.size === 1 ? [...exports.values()][0] : undefined);
        if (!device) throw new ProtocolError('unknown export'); // this option has no error reply: close
        socket.write(exportNameReply(device.size, transmissionFlags(device.readOnly), noZeroes));
        break;
      }
      case OPT.ABORT:
        socket.write(optionReply(option, REP.ACK));
        socket.end();
        return;
      case OPT.LIST:
        if (len !== 0) {
          socket.write(optionReply(option, REP.ERR_INVALID));
          break;
        }
        for (const name of exports.keys()) socket.write(optionReply(option, REP.SERVER, serverListEntry(name)));
        socket.write(optionReply(option, REP.ACK));
        break;
      case OPT.INFO:
      case OPT.GO: {
        const go = parseGoData(data);
        if (!go) {
          socket.write(optionReply(option, REP.ERR_INVALID));
          break;
        }
        const name = go.name;
        const dev = exports.get(name) ?? (name === '' && exports.size === 1 ? [...exports.values()][0] : undefined);
        if (!dev) {
          socket.write(optionReply(option, REP.ERR_UNKNOWN, Buffer.from(`no export named "${name}"`)));
          break;
        }
        socket.write(optionReply(option, REP.INFO, exportInfo(dev.size, transmissionFlags(dev.readOnly))));
        socket.write(optionReply(option, REP.INFO, blockSizeInfo(1, 4096, MAX_PAYLOAD)));
        socket.write(optionReply(option, REP.ACK));
        if (option === OPT.GO) device = dev;
        break;
      }
      default:
        socket.write(optionReply(option, REP.ERR_UNSUP));
    }
  }
  await transmission(socket, rd, device);
}

const MAX_READS_IN_FLIGHT = 16;
const MAX_UNSENT_REPLY_BYTES = 64 * 1024 * 1024;

/** The NBD error a client sees for a failed disk operation. */
function errnoFor(err: unknown): number {
  if (err instanceof DiskError) {
    if (err.reason === 'range') return ERR.EINVAL;
    if (err.reason === 'read-only') return ERR.EPERM;
  }
  return ERR.EIO;
}

async function transmission(socket: Socket, rd: SocketReader, dev: BlockDevice): Promise<void> {
  // Reads are pipelined (replies may come out of order, matched by handle); anything that
  // changes the disk waits for them, so writes and flushes keep their order.
  const reads = new Set<Promise<void>>();
  const drain = () => Promise.all(reads);
  for (;;) {
    // A client that sends requests but does not read replies must not grow our memory without bound.
    if (socket.writableLength > MAX_UNSENT_REPLY_BYTES) {
      await new Promise<void>((resolve) => {
        socket.once('drain', resolve);
        socket.once('close', resolve);
      });
    }
    const req = parseRequest(await rd.read(28));
    if (!req) throw new ProtocolError('bad request magic');
    const inRange = req.offset + BigInt(req.length) <= BigInt(dev.size);
    const offset = Number(req.offset);
    const fua = (req.flags & CMD_FLAG_FUA) !== 0;
    const reply = (err: number, data?: Buffer) => {
      // Header and payload as two writes in one corked batch: the payload is never copied.
      socket.cork();
      socket.write(simpleReply(err, req.handle));
      if (data) socket.write(data);
      process.nextTick(() => socket.uncork());
    };
    switch (req.type) {
      case CMD.READ: {
        if (req.length > MAX_PAYLOAD || !inRange) {
          reply(ERR.EINVAL);
          break;
        }
        const p = dev.read(offset, req.length).then((d) => void reply(0, d), (e: unknown) => void reply(errnoFor(e)));
        reads.add(p);
        void p.finally(() => reads.delete(p));
        if (reads.size >= MAX_READS_IN_FLIGHT) await Promise.race(reads);
        break;
      }
      case CMD.WRITE: {
        if (req.length > MAX_PAYLOAD) throw new ProtocolError('write too large'); // cannot skip its payload safely
        const data = await rd.read(req.length);
        await drain();
        if (dev.readOnly) reply(ERR.EPERM);
        else if (!inRange) reply(ERR.ENOSPC);
        else await dev.write(offset, Buffer.from(data), fua).then(() => reply(0), (e: unknown) => reply(errnoFor(e)));
        break;
      }
      case CMD.FLUSH:
        await drain();
        await dev.flush().then(() => reply(0), (e: unknown) => reply(errnoFor(e)));
        break;
      case CMD.TRIM:
      case CMD.WRITE_ZEROES:
        await drain();
        if (dev.readOnly) reply(ERR.EPERM);
        else if (!inRange) reply(ERR.ENOSPC);
        else await (req.type === CMD.TRIM ? dev.trim(offset, req.length) : dev.writeZeroes(offset, req.length, fua)).then(() => reply(0), (e: unknown) => reply(errnoFor(e)));
        break;
      case CMD.DISC:
        await drain();
        await dev.flush().catch(() => undefined);
        socket.end();
        return;
      default:
        reply(ERR.EINVAL);
    }
  }
}
