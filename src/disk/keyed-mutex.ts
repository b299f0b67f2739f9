/** Serialises async work per key (e.g. per chunk index); different keys run concurrently. */
export class KeyedMutex<K> {
  private readonly tails = new Map<K, Promise<void>>();

  async run<T>(key: K, fn: () => Promise<T>): Promise<T> {
    const prev = this.tails.get(key) ?? Promise.resolve();
    let release!: () => void;
    const mine = new Promise<void>((r) => (release = r));
    const tail = prev.then(() => mine);
    this.tails.set(key, tail);
    await prev;
    try {
      return await fn();
    } finally {
      release();
      // Nobody queued behind us: forget the key so the map stays small.
      if (this.tails.get(key) === tail) this.tails.delete(key);
    }
  }
}
