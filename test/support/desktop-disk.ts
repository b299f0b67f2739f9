/**
 * The test guest as a desktop's disk: bootable the way a real desktop's disk is (a BIOS boots it
 * from its first sector), so a desktop host runs it from its chain alone, with nothing outside the
 * disk (no -kernel/-initrd). Built without mounts or loop devices:
 *
 *   sector 0        syslinux's MBR code (package syslinux-common) and a DOS partition table
 *   partition 1     FAT16, bootable: syslinux (`syslinux --install --offset`, through mtools),
 *                   syslinux.cfg, the Debian kernel and the test guest's initramfs
 *   partition 2     ext4 (e2fsprogs): the desktop's data, /dev/vda2 in the guest, mounted on /mnt
 *
 * What the guest does is on the kernel command line in syslinux.cfg (`guestAppend`): e.g. a shell
 * on its VGA console until the ACPI power button (the online-desktop test types into it).
 */
import { execFile } from 'node:child_process';
import { open, readFile, rm, writeFile, mkdtemp } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { buildInitramfs, guestAppend, guestKernel, kernelRelease, makeExt4Image, readExt4File, type GuestAction } from './guest.js';

const run = promisify(execFile);
const SECTOR = 512;
/** Partitions start on 1 MiB boundaries, as fdisk puts them. */
const ALIGN = 2048;
/** FAT geometry mformat is given (heads × sectors per track = one MiB per cylinder). */
const HEADS = 64;
const SECTORS_PER_TRACK = 32;
export const SYSLINUX_MBR = '/usr/lib/syslinux/mbr/mbr.bin';

export interface DesktopDiskOptions {
  /** Size of the FAT boot partition; it holds the kernel (≈ 8 MiB) and the initramfs. */
  bootMiB?: number;
  /** Size of the ext4 data partition. */
  dataMiB?: number;
  /** Files on the data partition from the start. */
  files?: Record<string, string | Buffer>;
  /** What the guest does (syslinux.cfg's kernel command line). */
  actions: GuestAction[];
  /** Build the initramfs with the ACPI power-button watch (a `shell` or `writer` needs it to end). */
  powerButton?: boolean;
}

export interface DesktopDisk {
  path: string;
  sizeBytes: number;
  /** Byte offset and length of the ext4 data partition (to read it back from a copy of the disk). */
  data: { offset: number; bytes: number };
}

/** A DOS partition table entry (LBA, with CHS filled as fdisk does for a 255/63 geometry). */
function partitionEntry(start: number, sectors: number, type: number, bootable: boolean): Buffer {
  const chs = (lba: number) => {
    if (lba >= 1024 * 255 * 63) return [0xfe, 0xff, 0xff];
    const c = Math.floor(lba / (255 * 63));
    const h = Math.floor(lba / 63) % 255;
    const s = (lba % 63) + 1;
    return [h, s | ((c >> 2) & 0xc0), c & 0xff];
  };
  const e = Buffer.alloc(16);
  e[0] = bootable ? 0x80 : 0;
  Buffer.from(chs(start)).copy(e, 1);
  e[4] = type;
  Buffer.from(chs(start + sectors - 1)).copy(e, 5);
  e.writeUInt32LE(start, 8);
  e.writeUInt32LE(sectors, 12);
  return e;
}

async function tool(cmd: string, args: string[], pkg: string): Promise<void> {
  await run(cmd, args).catch((e: Error & { stderr?: string }) => {
    throw new Error(`${cmd} ${args.join(' ')} failed (package ${pkg}): ${e.stderr || e.message}`);
  });
}

/** Writes the bootable desktop disk (raw) to `path`. */
export async function makeDesktopDisk(path: string, o: DesktopDiskOptions): Promise<DesktopDisk> {
  const bootSectors = (o.bootMiB ?? 24) * 2048;
  const dataSectors = (o.dataMiB ?? 16) * 2048;
  const bootStart = ALIGN;
  const dataStart = bootStart + bootSectors;
  const total = dataStart + dataSectors;
  const tmp = await mkdtemp(join(tmpdir(), 'carryon-desktop-disk-'));
  try {
    const kernel = guestKernel();
    const initrd = await buildInitramfs(tmp, { kernelRelease: kernelRelease(kernel), powerButton: o.powerButton ?? true });
    const dataImage = join(tmp, 'data.ext4');
    await makeExt4Image(dataImage, dataSectors / 2048, o.files ?? {});

    // Sector 0: syslinux's MBR code (it boots the active partition), then the partition table.
    const mbr = Buffer.alloc(SECTOR);
    let code: Buffer;
    try {
      code = await readFile(SYSLINUX_MBR);
    } catch {
      throw new Error(`${SYSLINUX_MBR} missing: install the package syslinux-common (scripts/install-deps does)`);
    }
    code.subarray(0, 440).copy(mbr);
    partitionEntry(bootStart, bootSectors, 0x06, true).copy(mbr, 446);
    partitionEntry(dataStart, dataSectors, 0x83, false).copy(mbr, 462);
    mbr.writeUInt16LE(0xaa55, 510);
    const fh = await open(path, 'w');
    try {
      await fh.truncate(total * SECTOR);
      await fh.write(mbr, 0, SECTOR, 0);
      // The data partition: the ext4 image made beside it, copied in at its offset.
      const data = await readFile(dataImage);
      await fh.write(data, 0, data.length, dataStart * SECTOR);
    } finally {
      await fh.close();
    }

    // The boot partition: FAT (hidden sectors = its start, which the boot sector's loader adds), syslinux, its files.
    const fat = `${path}@@${bootStart * SECTOR}`;
    await tool('mformat', ['-i', fat, '-t', String(bootSectors / (HEADS * SECTORS_PER_TRACK)), '-h', String(HEADS), '-n', String(SECTORS_PER_TRACK), '-H', String(bootStart), '-v', 'CARRYONBOOT', '::'], 'mtools');
    await tool('syslinux', ['--install', '--offset', String(bootStart * SECTOR), path], 'syslinux');
    const cfg = join(tmp, 'syslinux.cfg');
    // The VGA console shows the boot (and is the shell's terminal); the serial port gets the markers.
    const append = ['console=tty0', 'console=ttyS0', 'quiet', 'panic=-1', 'mitigations=off', 'i8042.noaux', guestAppend(o.actions, { dev: '/dev/vda2' })].join(' ');
    await writeFile(cfg, ['DEFAULT guest', 'PROMPT 0', 'TIMEOUT 0', 'LABEL guest', '  KERNEL /vmlinuz', '  INITRD /initrd.gz', `  APPEND ${append}`, ''].join('\n'));
    await tool('mcopy', ['-i', fat, kernel, '::/vmlinuz'], 'mtools');
    await tool('mcopy', ['-i', fat, initrd, '::/initrd.gz'], 'mtools');
    await tool('mcopy', ['-i', fat, cfg, '::/syslinux.cfg'], 'mtools');
    return { path, sizeBytes: total * SECTOR, data: { offset: dataStart * SECTOR, bytes: dataSectors * SECTOR } };
  } finally {
    await rm(tmp, { recursive: true, force: true });
  }
}

/** A file on the data partition of `disk` (the desktop disk's bytes, e.g. a laptop's copy), read with debugfs. */
export async function readDataFile(disk: Buffer, layout: DesktopDisk['data'], path: string): Promise<Buffer> {
  const tmp = await mkdtemp(join(tmpdir(), 'carryon-desktop-data-'));
  try {
    const image = join(tmp, 'data.ext4');
    await writeFile(image, disk.subarray(layout.offset, layout.offset + layout.bytes));
    return await readExt4File(image, path);
  } finally {
    await rm(tmp, { recursive: true, force: true });
  }
}
