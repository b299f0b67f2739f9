/**
 * Long polls by key, in this process: `wait(key, ms, signal)` settles when `wake(key)` is called, after
 * `ms`, or when `signal` aborts, whichever comes first. Register before reading what the wake is about,
 * so a change between the read and the wait is not missed. Nothing is left behind once a wait settles
 * (no timer, no abort listener, no empty set), so a poll loop of any length holds O(open polls).
 */
export class KeyedWaiters {
  private readonly byKey = new Map<string, Set<() => void>>();

  wait(key: string, ms: number, signal?: AbortSignal): Promise<void> {
    return new Promise((resolve) => {
      let set = this.byKey.get(key);
      if (!set) this.byKey.set(key, (set = new Set()));
      const waiters = set;
      const done = () => {
        clearTimeout(timer);
        waiters.delete(done);
        if (!waiters.size && this.byKey.get(key) === waiters) this.byKey.delete(key);
        signal?.removeEventListener('abort', done);
        resolve();
      };
      const timer = setTimeout(done, Math.max(0, ms));
      timer.unref();
      waiters.add(done);
      if (signal?.aborted) done();
      else signal?.addEventListener('abort', done, { once: true });
    });
  }

  /** Settles every wait on `key` now. */
  wake(key: string): void {
    for (const done of [...(this.byKey.get(key) ?? [])]) done();
  }

  /** How many waits are open (all keys, or one). */
  size(key?: string): number {
    if (key !== undefined) return this.byKey.get(key)?.size ?? 0;
    let n = 0;
    for (const s of this.byKey.values()) n += s.size;
    return n;
  }
}
