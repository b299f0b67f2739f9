import { spawn } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import { mkdir, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { createWithQemu } from '../src/disk/layer-template.js';
import { MB, run } from './lib/measure.js';
import type { BenchRow, BenchSection } from './types.js';


/** utime + stime of a live process, in seconds (USER_HZ = 100 on Linux). */
function cpuSeconds(pid: number): number {
  const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  return (Number(fields[11]) + Number(fields[12])) / 100;
}

/** Writes `data` into `image` through qemu-storage-daemon's NBD export with nbdcopy; the daemon's CPU seconds. */
async function daemonCpuForWrite(dir: string, image: string, data: string, encrypted: boolean): Promise<{ cpu: number; seconds: number }> {
  const sock = join(dir, 'q.sock');
  await rm(sock, { force: true });
  const node = { driver: 'qcow2', 'node-name': 'b', file: { driver: 'file', filename: image }, ...(encrypted ? { encrypt: { format: 'luks', 'key-secret': 's0' } } : {}) };
  // A throwaway passphrase for a throwaway image: on the command line is fine here.
  const qsd = spawn('qemu-storage-daemon', ['--object', 'secret,id=s0,data=bench-pass', '--blockdev', JSON.stringify(node),
    '--nbd-server', `addr.type=unix,addr.path=${sock}`, '--export', 'type=nbd,id=e,node-name=b,name=b,writable=on'], { stdio: 'ignore' });
  try {
    for (let i = 0; i < 100 && !existsSync(sock); i++) await new Promise((r) => setTimeout(r, 50));
    const t = Date.now();
    await run('nbdcopy', [data, `nbd+unix:///b?socket=${sock}`]);
    const seconds = (Date.now() - t) / 1000;
    return { cpu: cpuSeconds(qsd.pid!), seconds };
  } finally {
    qsd.kill('SIGTERM');
    await new Promise((r) => qsd.once('exit', r));
  }
}

/**
 * What re-encrypting a checked-out desktop into LUKS costs the laptop: QEMU's AES-256-XTS runs
 * per 512-byte sector, and on this box that, not Carryon's pipeline, bounds check-out speed.
 */
export function luksCostSection(work: string, sizeGiB: number): BenchSection {
  return {
    name: 'Encryption cost inside QEMU: qemu-storage-daemon writing random data into a qcow2, LUKS vs plain',
    async run() {
      const dir = join(work, 'luks-cost');
      await mkdir(dir, { recursive: true });
      const data = join(dir, 'data.raw');
      await run('sh', ['-c', `head -c ${Math.round(sizeGiB * 2 ** 30)} /dev/urandom > ${data}`]);
      const bytes = Math.round(sizeGiB * 2 ** 30);
      const measure = async (encrypted: boolean) => {
        const image = join(dir, encrypted ? 'luks.qcow2' : 'plain.qcow2');
        await rm(image, { force: true });
        const opts = `cluster_size=262144${encrypted ? ',encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10' : ''}`;
        if (encrypted) await createWithQemu(['create', '-q', '-f', 'qcow2', '--object', 'secret,id=sec0,file=@SECRET@,format=raw', '-o', opts, image, String(2 * bytes)], 'bench-pass');
        else await run('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', opts, image, String(2 * bytes)]);
        return daemonCpuForWrite(dir, image, data, encrypted);
      };
      const luks = await measure(true);
      const plain = await measure(false);
      const xts = /aes-256-xts\s+([\d.]+)k/i.exec(await run('openssl', ['speed', '-evp', 'aes-256-xts', '-bytes', '512', '-seconds', '1']).then((o) => o.stdout, () => ''));
      const rows: BenchRow[] = [
        { section: 'luks', name: `qemu-storage-daemon CPU per GiB written, LUKS qcow2 (AES-256-XTS)`, value: luks.cpu / sizeGiB, unit: 'CPU s/GiB', runs: 1, spread: 0,
          peer: { name: 'same, plain qcow2', value: plain.cpu / sizeGiB, unit: 'CPU s/GiB' },
          note: `XTS alone ≈ ${((luks.cpu - plain.cpu) / sizeGiB).toFixed(2)} CPU s/GiB (${(bytes / MB / Math.max(0.01, luks.cpu - plain.cpu)).toFixed(0)} MB/s per core); nbdcopy wall ${luks.seconds.toFixed(2)} s vs ${plain.seconds.toFixed(2)} s${xts ? `; openssl speed aes-256-xts, 512-byte blocks, one core: ${(Number(xts[1]) * 1000 / MB).toFixed(0)} MB/s` : ''}` },
      ];
      await rm(dir, { recursive: true, force: true });
      return rows;
    },
  };
}
