import type { ChunkStore } from './chunk-store.js';

/**
 * Writers whose blobs no snapshot references yet (an import until its snapshot commits) hold the
 * store here; garbage collection in this process never sweeps a blob stored after the oldest
 * hold began. (Check-ins do not hold: their blobs arrive at transfer servers, often other
 * processes. The grace and each blob's last-use mark keep them until the commit names them; a
 * commit that finds one swept answers `missing-chunks` and the laptop sends it again.)
 */
const holds = new WeakMap<ChunkStore, Map<symbol, number>>();

export function holdStore(store: ChunkStore): () => void {
  let m = holds.get(store);
  if (!m) holds.set(store, (m = new Map()));
  const key = Symbol('hold');
  m.set(key, Date.now());
  return () => void m.delete(key);
}

/** When the oldest current hold on `store` began, or null when none is held. */
export function oldestHold(store: ChunkStore): number | null {
  const m = holds.get(store);
  return m && m.size ? Math.min(...m.values()) : null;
}
