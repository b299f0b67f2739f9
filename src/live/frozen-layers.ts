import { join } from 'node:path';
import { rm } from 'node:fs/promises';
import { layerSecret, type Chain } from '../disk/chain.js';
import { addLayer, StorageDaemon } from '../disk/storage-daemon.js';

/**
 * A live replica's frozen layers, read by the replica's own process instead of the holder. The
 * holder (QEMU running the guest, or `carryon serve`'s storage daemon) then spends nothing on the
 * replica's reads: they run in a storage daemon of the sender's, at the sender's priority (a
 * background replica's nice 15), while the guest's I/O keeps the holder to itself.
 *
 * Safe because a frozen layer is a closed book until the fold: after the point in time nobody
 * writes it (the guest writes the new top), and the holder folds it into the base (or takes the
 * top back into it, on abandon) only when the sender asks, which the sender does after `close`.
 * Each disk is opened as the holder's frozen view: the frozen layer over the base. The sender
 * mostly reads the frozen layer's own pages (the extents the holder mapped), but a chunk the server
 * asks for whole (its base chunk no longer in the check-out's checkpoint) is read whole, the base's
 * bytes where the layer has none. Read-only, sharing every permission and taking no file lock (the
 * holder holds the files open; a lock of ours would only stand in its fold's way). The daemon dies
 * with the sender (setpriv --pdeathsig), so a killed sender leaves no reader behind.
 */
export class FrozenLayers {
  private constructor(
    private readonly qsd: StorageDaemon,
    private readonly runDir: string,
    readonly socketPath: string,
    private readonly names: ReadonlyMap<string, string>,
  ) {}

  /** `runDir`: a private directory of this process alone (its daemon's monitor and NBD socket go there). */
  static async open(runDir: string, layers: { name: string; chain: Chain }[]): Promise<FrozenLayers> {
    const qsd = await StorageDaemon.start(runDir);
    try {
      const names = new Map<string, string>();
      const exports: { node: string; name: string; writable: boolean }[] = [];
      for (const [i, { name, chain }] of layers.entries()) {
        const node = `frozen${i}`;
        const layer = (filename: string, secretId: string, backing: Record<string, unknown> | null) => ({
          driver: 'qcow2', 'read-only': true, 'force-share': true, backing,
          file: { driver: 'file', filename, 'read-only': true, locking: 'off' },
          encrypt: { format: 'luks', 'key-secret': secretId },
        });
        await qsd.qmp.execute('object-add', { 'qom-type': 'secret', id: `${node}-base-sec`, data: layerSecret(chain, 'base'), format: 'raw' });
        await addLayer(qsd, { ...layer(chain.files.top, `${node}-sec`, layer(chain.files.base, `${node}-base-sec`, null)), 'node-name': node }, `${node}-sec`, layerSecret(chain, 'top'));
        names.set(name, `frozen-${i}`);
        exports.push({ node, name: `frozen-${i}`, writable: false });
      }
      const socketPath = join(runDir, 'frozen.sock');
      await qsd.exportNbd(socketPath, exports);
      return new FrozenLayers(qsd, runDir, socketPath, names);
    } catch (err) {
      await qsd.stop(5_000).catch(() => undefined);
      await rm(runDir, { recursive: true, force: true }).catch(() => undefined);
      throw err;
    }
  }

  /** The NBD export name of disk `name`'s frozen layer. */
  exportName(name: string): string {
    const e = this.names.get(name);
    if (!e) throw new Error(`no frozen layer of disk ${name} is open`);
    return e;
  }

  /** Closes every layer (before the holder may fold or abandon them). */
  async close(): Promise<void> {
    await this.qsd.stop(5_000);
    await rm(this.runDir, { recursive: true, force: true });
  }
}
