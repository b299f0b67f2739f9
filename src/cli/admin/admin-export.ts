import { execFile } from 'node:child_process';
import { open, rename, rm } from 'node:fs/promises';
import { promisify } from 'node:util';
import type { Command } from 'commander';
import { request } from 'undici';
import { isZero } from '../../core/chunks/chunking.js';
import { CarryonError } from '../../core/errors.js';
import { pinnedAgent } from '../../net/pinned-agent.js';
import { enc, say, withAdmin, type Json } from './admin-shared.js';
import { byteProgress, printJsonOr } from '../common.js';
import { bytes } from '../format.js';

const run = promisify(execFile);

interface ExportOpts { snapshot?: string; format: string; disk?: string; quiet?: boolean }

/**
 * `carryon admin desktops export NAME OUT`: a snapshot's disk streamed from the broker (raw,
 * plaintext over the pinned TLS session) into a sparse file here, then converted by qemu-img for
 * qcow2. Written under a temporary name and renamed only when whole: a cut stream leaves no OUT.
 */
export function registerExportCommand(desktops: Command): void {
  desktops.command('export <desktop> <out>').description('write a snapshot of a desktop (the current one, or --snapshot) to an image file on this machine (audited)')
    .option('--snapshot <id>', 'a restore point (see `restore-points`); default: the current version')
    .option('--format <fmt>', 'raw or qcow2', 'raw')
    .option('--disk <name>', 'which disk (default: the first)')
    .option('--quiet', 'no progress output')
    .action(async (desktop: string, out: string, o: ExportOpts, cmd: Command) => {
      if (o.format !== 'raw' && o.format !== 'qcow2') throw new CarryonError('invalid', `--format must be raw or qcow2, not ${o.format}`);
      await withAdmin(cmd, async (b, g) => {
        const q = new URLSearchParams({ ...(o.snapshot ? { snapshot: o.snapshot } : {}), ...(o.disk ? { disk: o.disk } : {}) });
        const rawPath = o.format === 'raw' ? `${out}.part` : `${out}.raw.part`;
        const agent = pinnedAgent(g.fingerprint);
        try {
          const res = await request(`${b.url}/v1/admin/desktops/${enc(desktop)}/export?${q}`, { dispatcher: agent, headers: { authorization: `Bearer ${b.token}` } });
          if (res.statusCode >= 400) {
            const body = (await res.body.json().catch(() => ({}))) as Json;
            throw new CarryonError(String(body.error ?? 'export-failed'), String(body.message ?? `HTTP ${res.statusCode}`));
          }
          const size = Number(res.headers['content-length']);
          const snapshot = String(res.headers['x-carryon-snapshot'] ?? '');
          const disk = String(res.headers['x-carryon-disk'] ?? '');
          const written = await receive(res.body, rawPath, size, byteProgress(`export ${desktop}`, Boolean(o.quiet || g.json)));
          if (written !== size) throw new CarryonError('export-failed', `the broker stopped after ${bytes(written)} of ${bytes(size)} (see \`carryon admin events --action export\`)`);
          if (o.format === 'qcow2') {
            await run('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', rawPath, `${out}.part`]).catch((err: Error) => {
              throw new CarryonError('export-failed', `qemu-img convert failed: ${err.message}`);
            });
            await rm(rawPath, { force: true });
          }
          await rename(`${out}.part`, out);
          const result = { desktop, snapshot, disk, format: o.format, sizeBytes: size, file: out };
          printJsonOr(Boolean(g.json), result, () => say(`wrote ${out} (${o.format}, ${bytes(size)}): ${desktop} disk ${disk}, snapshot ${snapshot}`));
        } catch (err) {
          await rm(rawPath, { force: true });
          await rm(`${out}.part`, { force: true });
          throw err;
        } finally {
          await agent.close();
        }
      });
    });
}

/** Writes the stream into a sparse file of `size` bytes (all-zero pieces are skipped); the bytes received. */
async function receive(body: AsyncIterable<Buffer>, path: string, size: number, progress: { update: (done: number, total: number) => void; stop: () => void }): Promise<number> {
  const fh = await open(path, 'w', 0o600);
  let at = 0;
  try {
    await fh.truncate(size);
    try {
      for await (const piece of body) {
        if (!isZero(piece)) await fh.write(piece, 0, piece.length, at);
        at += piece.length;
        progress.update(at, size);
      }
    } catch {
      // A stream cut part-way: reported by the caller from the byte count.
    }
    await fh.sync();
    return at;
  } finally {
    progress.stop();
    await fh.close();
  }
}
