import { mkdir, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { generate } from 'selfsigned';
import { certFingerprint } from './pinned-agent.js';

export interface TlsMaterial {
  cert: string;
  key: string;
  /** SHA-256 of the certificate (hex): what clients pin. */
  fingerprint: string;
  /** True when this call generated it (first start): print the fingerprint for the admin. */
  created: boolean;
}

/**
 * Uses `certFile`/`keyFile` when given; otherwise a self-signed EC P-256 certificate kept in
 * `dir` (tls.crt / tls.key, 0600), generated at first start. Clients pin its fingerprint.
 */
export async function loadOrCreateTls(opts: { dir: string; certFile?: string; keyFile?: string; hostnames?: string[] }): Promise<TlsMaterial> {
  if (opts.certFile || opts.keyFile) {
    if (!opts.certFile || !opts.keyFile) throw new Error('TLS needs both a certificate file and a key file');
    const cert = await readFile(opts.certFile, 'utf8');
    const key = await readFile(opts.keyFile, 'utf8');
    return { cert, key, fingerprint: certFingerprint(cert), created: false };
  }
  const certPath = join(opts.dir, 'tls.crt');
  const keyPath = join(opts.dir, 'tls.key');
  try {
    const [cert, key] = await Promise.all([readFile(certPath, 'utf8'), readFile(keyPath, 'utf8')]);
    return { cert, key, fingerprint: certFingerprint(cert), created: false };
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err;
  }
  const names = opts.hostnames ?? ['localhost'];
  const pems = await generate([{ name: 'commonName', value: names[0] ?? 'localhost' }], {
    keyType: 'ec',
    curve: 'P-256',
    algorithm: 'sha256',
    notAfterDate: new Date(Date.now() + 10 * 365 * 24 * 3600 * 1000),
    extensions: [
      { name: 'basicConstraints', cA: false },
      { name: 'keyUsage', digitalSignature: true, keyEncipherment: true },
      { name: 'extKeyUsage', serverAuth: true },
      {
        name: 'subjectAltName',
        altNames: [...names.map((value) => ({ type: 2 as const, value })), { type: 7 as const, ip: '127.0.0.1' }],
      },
    ],
  });
  await mkdir(opts.dir, { recursive: true });
  await writeFile(keyPath, pems.private, { mode: 0o600 });
  await writeFile(certPath, pems.cert, { mode: 0o644 });
  return { cert: pems.cert, key: pems.private, fingerprint: certFingerprint(pems.cert), created: true };
}
