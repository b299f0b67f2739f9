/** NBD protocol constants (newstyle fixed handshake, simple replies). See the NBD protocol spec. */
export const NBDMAGIC = 0x4e42444d41474943n;
export const IHAVEOPT = 0x49484156454f5054n;
export const OPT_REPLY_MAGIC = 0x3e889045565a9n;
export const REQUEST_MAGIC = 0x25609513;
export const SIMPLE_REPLY_MAGIC = 0x67446698;

export const FLAG_FIXED_NEWSTYLE = 1;
export const FLAG_NO_ZEROES = 2;

export const OPT = { EXPORT_NAME: 1, ABORT: 2, LIST: 3, STARTTLS: 5, INFO: 6, GO: 7, STRUCTURED_REPLY: 8 } as const;
export const REP = { ACK: 1, SERVER: 2, INFO: 3, ERR_UNSUP: 0x80000001, ERR_POLICY: 0x80000002, ERR_INVALID: 0x80000003, ERR_UNKNOWN: 0x80000006 } as const;
export const INFO = { EXPORT: 0, NAME: 1, DESCRIPTION: 2, BLOCK_SIZE: 3 } as const;

export const TFLAG = { HAS_FLAGS: 1, READ_ONLY: 2, SEND_FLUSH: 4, SEND_FUA: 8, SEND_TRIM: 32, SEND_WRITE_ZEROES: 64, CAN_MULTI_CONN: 256 } as const;
export const CMD = { READ: 0, WRITE: 1, DISC: 2, FLUSH: 3, TRIM: 4, WRITE_ZEROES: 6 } as const;
export const CMD_FLAG_FUA = 1;
export const ERR = { EPERM: 1, EIO: 5, ENOMEM: 12, EINVAL: 22, ENOSPC: 28, EOVERFLOW: 75, ENOTSUP: 95 } as const;

/** Largest READ/WRITE payload we accept (as qemu-nbd: 32 MiB). */
export const MAX_PAYLOAD = 32 * 1024 * 1024;
/** Largest option payload during the handshake. */
export const MAX_OPTION = 4096;

export function optionReply(option: number, type: number, data: Buffer = Buffer.alloc(0)): Buffer {
  const b = Buffer.alloc(20 + data.length);
  b.writeBigUInt64BE(OPT_REPLY_MAGIC, 0);
  b.writeUInt32BE(option, 8);
  b.writeUInt32BE(type, 12);
  b.writeUInt32BE(data.length, 16);
  data.copy(b, 20);
  return b;
}

export function simpleReply(error: number, handle: Buffer, data?: Buffer): Buffer {
  const b = Buffer.alloc(16 + (data?.length ?? 0));
  b.writeUInt32BE(SIMPLE_REPLY_MAGIC, 0);
  b.writeUInt32BE(error, 4);
  handle.copy(b, 8);
  data?.copy(b, 16);
  return b;
}

export function transmissionFlags(readOnly: boolean): number {
  return TFLAG.HAS_FLAGS | TFLAG.SEND_FLUSH | TFLAG.SEND_FUA | TFLAG.CAN_MULTI_CONN | (readOnly ? TFLAG.READ_ONLY : TFLAG.SEND_TRIM | TFLAG.SEND_WRITE_ZEROES);
}

export interface Request {
  flags: number;
  type: number;
  handle: Buffer;
  offset: bigint;
  length: number;
}

export function parseRequest(b: Buffer): Request | null {
  if (b.readUInt32BE(0) !== REQUEST_MAGIC) return null;
  return { flags: b.readUInt16BE(4), type: b.readUInt16BE(6), handle: Buffer.from(b.subarray(8, 16)), offset: b.readBigUInt64BE(16), length: b.readUInt32BE(24) };
}

/** The export name (and requested info types) of an NBD_OPT_GO / NBD_OPT_INFO payload, or null if malformed. */
export function parseGoData(data: Buffer): { name: string; infoRequests: number[] } | null {
  if (data.length < 6) return null;
  const nameLen = data.readUInt32BE(0);
  if (nameLen > data.length - 6) return null;
  const count = data.readUInt16BE(4 + nameLen);
  if (4 + nameLen + 2 + 2 * count !== data.length) return null;
  const infoRequests: number[] = [];
  for (let i = 0; i < count; i++) infoRequests.push(data.readUInt16BE(4 + nameLen + 2 + 2 * i));
  return { name: data.subarray(4, 4 + nameLen).toString('utf8'), infoRequests };
}

/** NBD_INFO_EXPORT payload: size and transmission flags. */
export function exportInfo(size: number, flags: number): Buffer {
  const b = Buffer.alloc(12);
  b.writeUInt16BE(INFO.EXPORT, 0);
  b.writeBigUInt64BE(BigInt(size), 2);
  b.writeUInt16BE(flags, 10);
  return b;
}

/** NBD_INFO_BLOCK_SIZE payload: minimum, preferred and maximum block sizes. */
export function blockSizeInfo(min: number, preferred: number, max: number): Buffer {
  const b = Buffer.alloc(14);
  b.writeUInt16BE(INFO.BLOCK_SIZE, 0);
  b.writeUInt32BE(min, 2);
  b.writeUInt32BE(preferred, 6);
  b.writeUInt32BE(max, 10);
  return b;
}

/** NBD_REP_SERVER payload for NBD_OPT_LIST. */
export function serverListEntry(name: string): Buffer {
  const n = Buffer.from(name, 'utf8');
  const d = Buffer.alloc(4 + n.length);
  d.writeUInt32BE(n.length, 0);
  n.copy(d, 4);
  return d;
}

/** Reply to NBD_OPT_EXPORT_NAME: size, flags, and 124 zero bytes unless NO_ZEROES was agreed. */
export function exportNameReply(size: number, flags: number, noZeroes: boolean): Buffer {
  const b = Buffer.alloc(noZeroes ? 10 : 134);
  b.writeBigUInt64BE(BigInt(size), 0);
  b.writeUInt16BE(flags, 8);
  return b;
}

/** Server greeting of the newstyle handshake. */
export function serverHello(): Buffer {
  const b = Buffer.alloc(18);
  b.writeBigUInt64BE(NBDMAGIC, 0);
  b.writeBigUInt64BE(IHAVEOPT, 8);
  b.writeUInt16BE(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES, 16);
  return b;
}

/** Encodes a request (for tests and tools; the server only parses). */
export function encodeRequest(r: { flags?: number; type: number; handle: bigint; offset: bigint | number; length: number }): Buffer {
  const b = Buffer.alloc(28);
  b.writeUInt32BE(REQUEST_MAGIC, 0);
  b.writeUInt16BE(r.flags ?? 0, 4);
  b.writeUInt16BE(r.type, 6);
  b.writeBigUInt64BE(r.handle, 8);
  b.writeBigUInt64BE(BigInt(r.offset), 16);
  b.writeUInt32BE(r.length, 24);
  return b;
}
