import type { PackIndex } from '../../src/store/pack-index.js';

/**
 * A pack index whose commits fail while `failing` says so: the process is killed just before
 * them, or the database is away. Everything else (and `close`) goes to the real index.
 */
export function dyingIndex(index: PackIndex, failing: { insert?: boolean; relocate?: boolean }, message = 'killed before the index commit'): PackIndex & { inserts: number } {
  const dying = Object.assign(Object.create(index) as PackIndex, {
    inserts: 0,
    insert: async (rows: Parameters<PackIndex['insert']>[0], touched: number) => {
      if (failing.insert) throw new Error(message);
      dying.inserts++;
      return index.insert(rows, touched);
    },
    relocate: async (rows: Parameters<PackIndex['relocate']>[0]) => {
      if (failing.relocate) throw new Error(message);
      return index.relocate(rows);
    },
  });
  return dying;
}
